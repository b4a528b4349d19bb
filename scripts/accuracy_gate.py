#!/usr/bin/env python3
"""Accuracy gate for a retrained model: refuse it when its test accuracy falls too far below the current one.

    python3 scripts/accuracy_gate.py CURRENT NEW [--max-drop-points 0.5] [--probe-report FILE] [--report FILE]

CURRENT and NEW are model folders (or their ``model.json`` cards). Exit status 0: accepted; 1: refused
(more than ``--max-drop-points`` percentage points below the current model, or refused by the probe
validation); 2: a card or the probe report is missing or unreadable. No current model at all accepts the
new one. Standard library only, so it runs on any CI runner without the project's dependencies.

``--probe-report`` is the verdict ``fashion-models validate NEW --report FILE`` wrote (retrain.sh runs it
in the train container, where torch is): the same probe validation the service applies before it serves
a model (fashion/probe.py). The gate refuses what that validation refused, with its reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CARD_FILE = "model.json"  # fashion.checkpoint.CARD_FILE; not imported so the gate needs no torch
ACCEPTED, REFUSED, BAD_INPUT = 0, 1, 2


class GateError(Exception):
    """A card that cannot be judged, with the reason in words."""


def card_path(path: Path) -> Path:
    return path / CARD_FILE if path.is_dir() else path


def card_accuracy(card_file: Path) -> float:
    """The card's ``metrics.test_accuracy`` (a fraction), or GateError.

    Reads the card as ``fashion.checkpoint.read_card`` does, with the same messages, but without
    importing it: that module needs torch, and the gate runs on the host's bare python3 (retrain.sh).
    """
    card = _read_json(card_file, "model card")
    metrics = card.get("metrics") if isinstance(card, dict) else None
    accuracy = metrics.get("test_accuracy") if isinstance(metrics, dict) else None
    if isinstance(accuracy, bool) or not isinstance(accuracy, int | float) or not 0.0 <= accuracy <= 1.0:
        raise GateError(f"the model card {card_file} has no metrics.test_accuracy between 0 and 1")
    return float(accuracy)


def _read_json(path: Path, what: str):
    """The JSON document in ``path``, or GateError: "no <what> at ...", or why it cannot be read."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GateError(f"no {what} at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GateError(f"the {what} {path} cannot be read: {error}") from None


def judge(current: float | None, new: float, max_drop_points: float) -> tuple[bool, str]:
    """(accepted, one line saying why) for a new accuracy against the current one, both fractions."""
    if current is None:
        return True, f"accepted: test accuracy {new:.4f}; there is no current model to compare with"
    # Compare in points, rounded to the cards' precision, so 0.5 points below is still accepted.
    change = round((new - current) * 100, 6) + 0.0  # + 0.0 turns -0.0 into 0.0
    verdict = f"test accuracy {new:.4f} vs current {current:.4f} ({change:+.2f} points; allowed drop {max_drop_points})"
    if -change > max_drop_points:
        return False, f"refused: {verdict}"
    return True, f"accepted: {verdict}"


def probe_verdict(report_file: Path) -> dict:
    """The ``fashion-models validate --report`` verdict: {"accepted": bool, "reason", "message", ...}, or GateError."""
    report = _read_json(report_file, "probe validation report")
    if not isinstance(report, dict) or not isinstance(report.get("accepted"), bool):
        raise GateError(f"the probe validation report {report_file} has no accepted: true|false")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("current", type=Path, help="the current model's folder or card")
    parser.add_argument("new", type=Path, help="the retrained model's folder or card")
    parser.add_argument("--max-drop-points", type=float, default=0.5, help="percentage points (default 0.5)")
    parser.add_argument(
        "--probe-report", type=Path, help="the JSON verdict of `fashion-models validate NEW --report FILE`"
    )
    parser.add_argument("--report", type=Path, help="also write the verdict as JSON to this file")
    args = parser.parse_args(argv)
    if not args.max_drop_points >= 0:
        parser.error("--max-drop-points must be >= 0")
    return args


def main(args: argparse.Namespace) -> int:
    try:
        new = card_accuracy(card_path(args.new))
        current_card = card_path(args.current)
        current = card_accuracy(current_card) if current_card.exists() else None
        probe = probe_verdict(args.probe_report) if args.probe_report else None
    except GateError as error:
        print(f"accuracy gate: {error}", file=sys.stderr)
        return BAD_INPUT
    accepted, message = judge(current, new, args.max_drop_points)
    if probe is not None and not probe["accepted"]:
        # The probe's verdict first: a model that fails it must not be served, whatever its card says.
        accepted, message = False, f"refused by the probe validation ({probe.get('reason')}): {probe.get('message')}"
    print(f"accuracy gate: {message}")
    if args.report:
        report = {
            "accepted": accepted,
            "message": message,
            "new_test_accuracy": new,
            "current_test_accuracy": current,
            "max_drop_points": args.max_drop_points,
            "probe_validation": probe,
        }
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    return ACCEPTED if accepted else REFUSED


if __name__ == "__main__":
    sys.exit(main(parse_args()))
