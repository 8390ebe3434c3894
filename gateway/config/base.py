"""What every section of the policy models shares: ``StrictModel`` (unknown keys rejected),
``Priority`` and ``overlay``. It imports nothing of the gateway, so every section's module
can import it."""

from __future__ import annotations

from collections.abc import Collection
from enum import IntEnum
from typing import Annotated, Any, ClassVar, Literal, TypeGuard

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Priority(IntEnum):
    """Request classes; a lower number is more important."""

    critical = 0
    high = 1
    normal = 2
    low = 3

    @classmethod
    def parse(cls, value: str) -> Priority | None:
        """``critical``/``high``/``normal``/``low`` or ``0``-``3``; None when neither."""
        value = value.strip().lower()
        if value in cls.__members__:
            return cls[value]
        if value in ("0", "1", "2", "3"):
            return cls(int(value))
        return None


PriorityName = Literal["critical", "high", "normal", "low"]
PositiveFloat = Annotated[float, Field(gt=0)]


class StrictModel(BaseModel):
    """Base of every policy model: unknown keys and YAML type coercions are errors.

    A nested section given in part keeps the defaults of the keys it leaves out: for every
    field whose default is itself a model (``classes.critical``, ``concurrency``,
    ``self_protection``, ``state.degraded``...), a mapping in the input is laid over that
    default, recursively, before validation. So ``admission.classes.critical:
    {default_deadline_s: 5}`` keeps critical's queue target, queue size and holdback share.
    A model that is one value given whole sets ``overlays_defaults = False`` (a load test's
    ``Dist``); a section whose keys bound each other fits its defaults to the keys given
    (``fit_defaults``).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    # False for a model that is one value given whole (a load test's distribution: its median
    # alone means a constant), not a section whose defaults fill in the keys left out.
    overlays_defaults: ClassVar[bool] = True

    @classmethod
    def fit_defaults(cls, values: dict[str, Any], given: Collection[str]) -> dict[str, Any]:
        """``values`` (the section's defaults with the ``given`` keys laid over them) with the
        defaults fitted to what was given, where a default would contradict it. Unchanged
        here; a section whose keys bound each other overrides this."""
        return values

    @model_validator(mode="before")
    @classmethod
    def _over_section_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged: dict[str, Any] | None = None
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if isinstance(value, dict) and _is_section(field.default):
                merged = dict(data) if merged is None else merged
                merged[name] = overlay(field.default, value)
        return data if merged is None else merged


def overlay(default: BaseModel, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` laid over ``default``'s values: keys left out keep the default's (validated)
    values, nested sections are overlaid in turn; the result validates as the section."""
    out: dict[str, Any] = {name: getattr(default, name) for name in type(default).model_fields}
    for key, value in given.items():
        current = out.get(key)
        if isinstance(value, dict) and _is_section(current):
            out[key] = overlay(current, value)
        else:
            out[key] = value  # unknown keys too: validation names them
    section = type(default)
    return section.fit_defaults(out, given.keys()) if issubclass(section, StrictModel) else out


def _is_section(default: object) -> TypeGuard[BaseModel]:
    """A field default that a mapping given in part is laid over (``overlay``)."""
    return isinstance(default, BaseModel) and getattr(default, "overlays_defaults", True)
