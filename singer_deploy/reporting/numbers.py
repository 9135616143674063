"""How the report, the run summary and the model card print a number: 3-4 significant digits, at most 4 decimals,
scientific notation only for values below 1e-3 (where a fixed number of decimals would print 0).

Cosines close to 1 are the exception a gate needs: 0.999993 and 0.99999 both round to "1.0000", so a parity cosine
above 0.999 is printed as its distance to 1 ("1 - 7.0e-06"), which keeps the digits that decide the gate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

TINY = 1e-3          # below this, scientific notation
NEAR_ONE = 0.999     # a cosine above this is printed as 1 - distance
EXACT = 1e-12        # a cosine closer to 1 than this is 1 up to float64 rounding


def plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def is_number(value: Any) -> bool:
    value = plain(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt(value: Any) -> str:
    """A cell's text: numbers to 3-4 significant digits, None as a dash, booleans as yes / no."""
    value = plain(value)
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return fmt_float(value)
    return str(value)


def fmt_float(value: float) -> str:
    if not math.isfinite(value):
        return "n/a" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    size = abs(value)
    if size == 0:
        return "0"
    if size < TINY:
        return f"{value:.2e}"
    if size >= 1000:
        return f"{value:.0f}"
    if size >= 1:
        return f"{value:.{3 - math.floor(math.log10(size))}f}"     # 4 significant digits: 1.000, 10.43, 117.4
    return f"{value:.4f}"


def fmt_short(value: Any) -> str:
    """3 significant digits, for figures inside a sentence (ratios such as 10.4x or 0.713x)."""
    value = plain(value)
    if not isinstance(value, float) or not math.isfinite(value) or abs(value) < TINY or abs(value) >= 1000:
        return fmt(value)
    return f"{value:.3g}"


def fmt_cosine(value: Any) -> str:
    """A parity cosine: 4 decimals, or its distance to 1 when it is above NEAR_ONE."""
    value = plain(value)
    if not isinstance(value, float) or not math.isfinite(value) or value <= NEAR_ONE or value > 1:
        return fmt(value)
    return "1" if 1 - value < EXACT else f"1 - {1 - value:.1e}"
