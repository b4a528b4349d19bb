"""Numbers that must lie in a range, parsed from text: one parser for the training CLI and the service's settings.

``parse_bounded("0", int, minimum=1)`` raises ``ValueError("must be at least 1, got 0")``; the
caller adds where the text came from (an argparse option, an environment variable).
"""

from __future__ import annotations

import argparse
import math


def parse_bounded(
    text: str,
    kind: type[int] | type[float] = int,
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
) -> int | float:
    """``kind(text)`` when it is finite and within the bounds (minimum/maximum inclusive, above/below exclusive).

    Raises ValueError with a message that says what was expected, e.g. "'x' is not an integer" or
    "must be at least 0 and below 1, got 1.5". NaN and infinities are refused for floats.
    """
    text = text.strip()
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    bounds = []
    if minimum is not None:
        bounds.append(f"at least {minimum}")
    if above is not None:
        bounds.append(f"greater than {above}")
    if maximum is not None:
        bounds.append(f"at most {maximum}")
    if below is not None:
        bounds.append(f"below {below}")
    accepted = (
        math.isfinite(value)
        and (minimum is None or value >= minimum)
        and (above is None or value > above)
        and (maximum is None or value <= maximum)
        and (below is None or value < below)
    )
    if not accepted:
        requirement = " and ".join(bounds) if bounds else "a finite number"
        if bounds and kind is float:
            requirement = f"a finite number {requirement}"
        raise ValueError(f"must be {requirement}, got {text}")
    return value


def argparse_type(kind: type, **bounds):
    """An argparse ``type`` for parse_bounded: a bad value exits 2 with its message."""

    def parse(text: str):
        try:
            return parse_bounded(text, kind, **bounds)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse
