"""Policy file validation, the JSON Schema and the config CLI commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main
from gateway.config import GatewayConfig
from gateway.config.model import ConfigError, json_schema, load_config, resolve_api_key

ROOT = Path(__file__).resolve().parent.parent.parent
ERRORS = sorted((Path(__file__).parent.parent / "config_errors").glob("*.yaml"))


@pytest.mark.parametrize("path", ERRORS, ids=[p.stem for p in ERRORS])
def test_each_broken_policy_is_rejected_with_its_exact_message(path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 1, info.value.problems
    assert info.value.problems[0].startswith(expected), info.value.problems[0]
    assert str(info.value).startswith(f"{path}: ")


def test_the_example_policy_is_valid() -> None:
    config = load_config(ROOT / "config" / "example.yaml")
    assert config.state.backend == "memory"
    assert "gpt-4o-mini" in config.models


def test_schema_file_is_in_sync_with_the_config_model() -> None:
    on_disk = json.loads((ROOT / "config" / "schema.json").read_text())
    assert on_disk == json_schema(), "regenerate: gateway schema > config/schema.json"


def test_schema_rejects_unknown_keys_everywhere() -> None:
    schema = json_schema()
    for name, definition in schema["$defs"].items():
        if definition.get("type") == "object":
            assert definition.get("additionalProperties") is False, name


def test_provider_keys_come_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config.model import Provider

    monkeypatch.setenv("GW_TEST_KEY", "sk-from-env\n")
    assert resolve_api_key("p", Provider(kind="openai", base_url="http://x",
                                         api_key_env="GW_TEST_KEY")) == "sk-from-env"
    secret = tmp_path / "key"
    secret.write_text("sk-from-file\n")
    assert resolve_api_key("p", Provider(kind="openai", base_url="http://x",
                                         api_key_file=str(secret))) == "sk-from-file"
    monkeypatch.delenv("GW_TEST_KEY")
    with pytest.raises(ConfigError, match=r"\$GW_TEST_KEY is not set"):
        resolve_api_key("p", Provider(kind="openai", base_url="http://x",
                                      api_key_env="GW_TEST_KEY"))


def test_check_config_cli_reports_file_key_and_reason(capsys: pytest.CaptureFixture[str]) -> None:
    bad = Path(__file__).parent.parent / "config_errors" / "unknown_key.yaml"
    with pytest.raises(SystemExit) as info:
        main(["check-config", str(bad)])
    assert info.value.code == 2
    assert f"{bad}: tenants.t.rpm: unknown key" in capsys.readouterr().err
    assert main(["check-config", str(ROOT / "config" / "example.yaml")]) == 0
    assert "ok: 3 providers" in capsys.readouterr().out


def test_hash_key_cli_matches_what_the_gateway_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.request.auth import hash_key

    assert main(["hash-key", "sk-demo-acme"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == hash_key("sk-demo-acme")
    assert printed in (ROOT / "config" / "example.yaml").read_text()


def test_console_script_is_installed() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "version"], capture_output=True,
                         text=True, check=True)
    from gateway import __version__

    assert out.stdout.strip() == __version__


def test_a_cost_budget_with_no_priced_model_is_a_warning_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    key = "sha256:" + "0" * 64

    def write(models: str, tenant_models: str = "['*']") -> str:
        path = tmp_path / "policy.yaml"
        path.write_text(
            "providers:\n  main: {kind: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
            f"models:\n{models}"
            f"tenants:\n  acme:\n    api_keys: ['{key}']\n    models: {tenant_models}\n"
            "    budget: {daily_cost: 5, monthly_tokens: 1000000}\n")
        return str(path)

    free = "  m: {deployments: [{provider: main, model: x}]}\n"
    priced = ("  p: {deployments: [{provider: main, model: y}], price: "
              "{input_per_million: 1, output_per_million: 2, cached_input_per_million: 0.5}}\n")
    # check-config still passes, and says why the budget will never refuse
    assert main(["check-config", write(free)]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("tenants.acme.budget: daily_cost set, but no model this tenant may use has a "
               "price" in w for w in warned), warned
    assert "ok:" in capsys.readouterr().out
    caplog.clear()
    load_config(write(free + priced, "[m]"))  # the priced model is not one it may use
    assert any("tenants.acme.budget" in r.getMessage() for r in caplog.records)
    caplog.clear()
    load_config(write(free + priced))
    assert not [r for r in caplog.records if "budget" in r.getMessage()]


def test_example_sections_said_to_be_at_their_defaults_are() -> None:
    """config/example.yaml shows admission, breaker, retries and deferred "at their defaults":
    a user who copies it must get the shipped behaviour (it once set queue targets up to 10x
    the defaults and an initial limit of 20 while saying so)."""
    data = yaml.safe_load((ROOT / "config" / "example.yaml").read_text(encoding="utf-8"))

    def leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, (*path, key))
        else:
            yield path, node

    differ = []
    for section in ("admission", "breaker", "retries", "deferred"):
        field = GatewayConfig.model_fields[section]
        shipped = (field.default_factory() if field.default_factory  # type: ignore[call-arg]
                   else field.default).model_dump()
        for path, value in leaves(data[section]):
            if path[0] == "tenants":  # deferred.tenants: the example's own per-tenant choice
                continue
            default: Any = shipped
            for key in path:
                default = default[key]
            if default != value:
                differ.append(f"{section}.{'.'.join(path)}: {value} (default {default})")
    assert not differ, differ


def test_example_full_says_why_wherever_it_leaves_a_default() -> None:
    """config/example-full.yaml: "values are the defaults where a default exists, except where
    a comment says why not". Every value of its policy sections (not tenants, providers,
    models) that differs from the shipped default carries a comment on its line."""
    path = ROOT / "config" / "example-full.yaml"
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    root = yaml.compose(text)
    assert isinstance(root, yaml.MappingNode)

    def leaves(node: yaml.Node, line: int, path: tuple[str, ...]
               ) -> Iterator[tuple[tuple[str, ...], int]]:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                yield from leaves(value, key.start_mark.line, (*path, key.value))
        else:
            yield path, line

    data = yaml.safe_load(text)
    silent = []
    for key, node in root.value:
        section = key.value
        if section in ("tenants", "providers", "models"):
            continue
        field = GatewayConfig.model_fields[section]
        shipped: Any = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        shipped = shipped.model_dump() if hasattr(shipped, "model_dump") else shipped
        for leaf, line in leaves(node, key.start_mark.line, (section,)):
            default: Any = {section: shipped}
            value: Any = data
            try:
                for part in leaf:
                    default, value = default[part], value[part]
            except (KeyError, TypeError):
                continue  # a map of the example's own names (deployments, tenants): no default
            if default != value and "#" not in lines[line]:
                silent.append(f"{'.'.join(leaf)}: {value} (default {default})")
    assert not silent, silent


@pytest.mark.parametrize("env", [None, ""], ids=["unset", "empty"])
def test_serve_without_a_redis_url_says_which_setting_in_one_line(
    tmp_path: Path, env: str | None
) -> None:
    """The shipped Kubernetes policies take the Redis URL from REDIS_URL (a Secret): a missing
    or empty key crashed `serve` with a traceback, pod after pod."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "providers:\n  main: {kind: openai, base_url: 'http://127.0.0.1:9/v1'}\n"
        "models:\n  m: {deployments: [{provider: main, model: x}]}\n"
        f"tenants:\n  acme: {{api_keys: ['sha256:{'0' * 64}'], models: ['*']}}\n"
        "state: {backend: redis}\n")
    environ = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    if env is not None:
        environ["REDIS_URL"] = env
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config", str(policy),
                          "--port", "0"], capture_output=True, text=True, env=environ,
                         timeout=60, check=False)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "state.redis_url" in out.stderr and "REDIS_URL" in out.stderr
