"""Reading numbers out of Tune results and MLflow tags, where anything may be missing, a string or NaN."""

from __future__ import annotations

import math
from typing import Any


def finite_float(value: Any) -> float | None:
    """`value` as a finite float, else None (missing, not a number, NaN or inf)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
