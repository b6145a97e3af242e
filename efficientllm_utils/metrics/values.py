"""A metric value that always says how it was obtained.

``method`` is one of ``measured:<counter>``, ``estimated:<model>`` or
``unavailable:<reason>``. An unavailable metric has ``value=None``: it is never
filled with a default.
"""
from __future__ import annotations

import math

from pydantic import BaseModel, model_validator


class MetricValue(BaseModel):
    value: float | None
    unit: str
    method: str

    @model_validator(mode="after")
    def _consistent(self) -> "MetricValue":
        kind = self.method.split(":", 1)[0]
        if kind not in {"measured", "estimated", "unavailable"}:
            raise ValueError(f"method {self.method!r} must start with measured:, estimated: or unavailable:")
        if kind == "unavailable" and self.value is not None:
            raise ValueError("an unavailable metric carries no value")
        if kind != "unavailable" and (self.value is None or not math.isfinite(self.value)):
            raise ValueError(f"a {kind} metric needs a finite value, got {self.value!r}")
        return self

    @classmethod
    def measured(cls, value: float, unit: str, counter: str) -> "MetricValue":
        return cls(value=float(value), unit=unit, method=f"measured:{counter}")

    @classmethod
    def estimated(cls, value: float, unit: str, model: str) -> "MetricValue":
        return cls(value=float(value), unit=unit, method=f"estimated:{model}")

    @classmethod
    def unavailable(cls, unit: str, reason: str) -> "MetricValue":
        return cls(value=None, unit=unit, method=f"unavailable:{reason}")

    def per(self, count: float, unit: str, basis: str) -> "MetricValue":
        """This total shared over ``count`` things (energy per token, ...), its method naming the ``basis``."""
        return MetricValue(value=self.value / count, unit=unit, method=f"{self.method}/{basis}")


def flatten(metrics: dict[str, MetricValue]) -> dict[str, object]:
    """``{"aec": MetricValue}`` -> ``{"aec": 12.0, "aec_unit": "W", "aec_method": "..."}``."""
    flat: dict[str, object] = {}
    for name, metric in metrics.items():
        flat[name] = metric.value
        flat[f"{name}_unit"] = metric.unit
        flat[f"{name}_method"] = metric.method
    return flat
