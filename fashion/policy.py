"""What the model-trust rules are set by, without torch: the service's settings read them at start.

``ValidationPolicy`` is when fashion.probe.validate_candidate refuses a candidate model, set by the
environment variables MIN_PROBE_ACCURACY, MAX_PROBE_DROP and MIN_PROBE_AGREEMENT (the service,
``fashion-models`` and ``fashion-predict`` read the same ones). ``VERSION_PATTERN`` is what a model
version looks like: the first 12 hex digits of the weights' SHA-256 (MODEL_VERSION, fashion.history).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from fashion.bounds import parse_bounded

VERSION_PATTERN = re.compile(r"[0-9a-f]{12}")


@dataclass(frozen=True)
class ValidationPolicy:
    """When a candidate is refused; the environment variables of the same names set it."""

    min_accuracy: float = 0.80  # MIN_PROBE_ACCURACY: the absolute floor
    max_drop: float = 0.03  # MAX_PROBE_DROP: allowed shortfall against the card's claims
    min_agreement: float = 0.99  # MIN_PROBE_AGREEMENT: share of recorded predictions reproduced

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ValidationPolicy:
        """The policy from MIN_PROBE_ACCURACY, MAX_PROBE_DROP, MIN_PROBE_AGREEMENT; ValueError naming a bad one."""
        environ = os.environ if environ is None else environ
        values = {}
        for field, name, default in (
            ("min_accuracy", "MIN_PROBE_ACCURACY", cls.min_accuracy),
            ("max_drop", "MAX_PROBE_DROP", cls.max_drop),
            ("min_agreement", "MIN_PROBE_AGREEMENT", cls.min_agreement),
        ):
            raw = environ.get(name, "").strip()
            try:
                values[field] = parse_bounded(raw, float, minimum=0.0, maximum=1.0) if raw else default
            except ValueError as error:
                raise ValueError(f"{name}={raw!r}: {error}") from None
        return cls(**values)

    def describe(self) -> dict:
        return {"min_accuracy": self.min_accuracy, "max_drop": self.max_drop, "min_agreement": self.min_agreement}
