"""docs/configuration.md and the example policies: complete, current, and valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import Field

from gateway.cli import main
from gateway.config import doc as config_doc
from gateway.config.model import GatewayConfig, StrictModel

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLES = [ROOT / name for name in config_doc.EXAMPLES]


def test_every_policy_key_has_a_description() -> None:
    assert config_doc.missing_descriptions() == [], (
        "give each of these a Field(description=...): docs/configuration.md is made from them")


def test_a_key_without_a_description_is_reported() -> None:
    class Inner(StrictModel):
        """A section: its docstring describes the key that holds it."""

        documented: int = Field(1, description="has one")
        bare: int = 2

    class Outer(StrictModel):
        inner: Inner = Inner()
        plain: bool = False

    assert config_doc.missing_descriptions(Outer) == ["plain", "inner.bare"]


def test_configuration_md_is_generated_from_the_current_models() -> None:
    on_disk = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    fresh = config_doc.render(config_doc.example_documents(ROOT))
    assert on_disk == fresh, f"docs/configuration.md is stale: run {config_doc.REGENERATE}"


def test_configuration_md_names_every_key_with_type_default_range_and_example() -> None:
    text = config_doc.render(config_doc.example_documents(ROOT))
    assert config_doc.REGENERATE in text.split("\n## ")[0]  # the header says how
    limits = text.split("### `tenants.<name>.limits`\n", 1)[1]
    row = next(line for line in limits.splitlines() if line.startswith("| `requests_per_minute`"))
    # key | type | default | range | what it does | example
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["integer or null", "null", ">= 1"]
    assert "429" in cells[4] and cells[5] == "`20000`"  # the example policy's value
    for section in config_doc.sections():
        title = config_doc._title(section.path)
        assert f"## {title}\n" in text or f"### {title}\n" in text, title
        for option in section.options:
            assert f"| `{option.path[-1]}` |" in text


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_policies_pass_check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(path)]) == 0
    assert ": ok:" in capsys.readouterr().out


def _paths(node: object, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out = set()
    if isinstance(node, dict):
        for key, value in node.items():
            out.add((*prefix, str(key)))
            out |= _paths(value, (*prefix, str(key)))
    return out


def test_every_section_and_tenant_option_is_shown_in_an_example_policy() -> None:
    shown: set[tuple[str, ...]] = set()
    for path in EXAMPLES:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for tenant in data["tenants"].values():
            # per_model is keyed by model name: compare the options, not the names
            for section in ("limits", "run_budget"):
                per_model = tenant.get(section, {}).get("per_model", {})
                for name in list(per_model):
                    per_model["<model>"] = per_model.pop(name)
            shown |= _paths(tenant)
        shown |= {(key,) for key in data}
    wanted: set[tuple[str, ...]] = {(key,) for key in GatewayConfig.model_fields}
    tenant_sections = [s for s in config_doc.sections() if s.path[:2] == ("tenants", "<name>")]
    for tenant_section in tenant_sections:
        for option in tenant_section.options:
            wanted.add(tuple("<model>" if p == "<name>" else p for p in option.path[2:]))
    missing = sorted(".".join(p) for p in wanted - shown)
    assert not missing, f"show these in config/example.yaml or config/example-full.yaml: {missing}"


def test_readme_links_the_reference_where_it_explains_running_for_real() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Run it for real", 1)[1].split("\n## ", 1)[0]
    assert "docs/configuration.md" in section


def test_the_readme_limits_and_budgets_yaml_is_a_valid_tenant() -> None:
    from gateway.config.model import parse_config
    from gateway.request.auth import hash_key

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Limits and budgets in five minutes", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    tenants = yaml.safe_load(snippet.replace("sha256:...", hash_key("sk-team-a")))["tenants"]
    example = yaml.safe_load((ROOT / "config" / "example.yaml").read_text(encoding="utf-8"))
    config = parse_config({**example, "tenants": tenants, "deferred": {}})
    limits, budget = config.tenants["team-a"].limits, config.tenants["team-a"].budget
    assert (limits.requests_per_minute, limits.max_concurrent, budget.daily_tokens) == (
        60, 8, 2_000_000)
