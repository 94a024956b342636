"""The scalar quantities of the field, each checked in one place: eps, k, sigma, alpha, counts.

Bottom of the import graph (this module itself needs no torch): the typed settings (:mod:`certprune.config`) are built from the types at the
end of this file, and the few library entry points that are also called directly (losses, masks, attacks) use the
checks too, so a Python user gets the same one-line message as a command-line user.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, StrictInt


def parse_eps(value, name: str = "eps") -> float:
    """A perturbation budget from a number or a fraction string (``0.1``, ``"8/255"``); finite and >= 0."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number or a fraction like 8/255, got {value!r}")
    if isinstance(value, str):
        text = value.replace(" ", "")
        try:
            number = float(text) if text.lower().lstrip("+-") in ("nan", "inf", "infinity") else float(Fraction(text))
        except ZeroDivisionError:
            raise ValueError(f"{name} {value!r} divides by zero") from None
        except OverflowError:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}") from None
        except ValueError:
            raise ValueError(f"{name} must be a number or a fraction like 8/255, got {value!r}") from None
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number or a fraction like 8/255, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def _number(value, name: str, meaning: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {meaning}, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {meaning}, got {value!r}") from None


def check_k(k) -> float:
    """The fraction of weights kept, in (0, 1]."""
    k = _number(k, "k", "a number in (0, 1]")
    if not (0.0 < k <= 1.0):  # also rejects NaN
        raise ValueError(f"k must be in (0, 1] (the fraction of weights kept), got {k}")
    return k


def check_sigma(sigma) -> float:
    """The smoothing noise's standard deviation: finite and > 0."""
    sigma = _number(sigma, "sigma", "a number > 0")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number > 0 (the noise's standard deviation), got {sigma}")
    return sigma


def check_alpha(alpha) -> float:
    """A failure probability, in (0, 1)."""
    alpha = _number(alpha, "alpha", "a number in (0, 1)")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1) (the failure probability), got {alpha}")
    return alpha


# ---- the same quantities as the settings' types (pydantic), one type per quantity --------------------------------


def _finite_positive(value: float) -> float:
    if not (value > 0 and value != float("inf")):
        raise ValueError("must be a finite number > 0")
    return value


def _positive_int(value: int) -> int:
    if value <= 0:
        raise ValueError("must be a whole number > 0")
    return value


def _epochs(value: int) -> int:
    if value < 0:
        raise ValueError("must be a whole number >= 0")
    return value


Eps = Annotated[float, BeforeValidator(parse_eps)]  # a number or a fraction such as "8/255", stored as a float
K = Annotated[float, BeforeValidator(check_k)]
Sigma = Annotated[float, BeforeValidator(check_sigma)]
Alpha = Annotated[float, BeforeValidator(check_alpha)]
PositiveInt = Annotated[StrictInt, AfterValidator(_positive_int)]
Epochs = Annotated[StrictInt, AfterValidator(_epochs)]
PositiveFloat = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_finite_positive)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
