"""Shared pieces of the policy models (kept apart to avoid import cycles)."""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


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
    """Base of every policy model: unknown keys and YAML type coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
