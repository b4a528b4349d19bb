"""``fashion-models``: the model folder's versions, validated promotion, rollback.

    fashion-models [--model-dir models] [--keep 5] list [--json]
    fashion-models promote VERSION|PATH     validate, archive the current model, install this one
    fashion-models rollback                 back to the model that served before the current one
    fashion-models validate PATH [--report FILE]

Every model that is installed passes the probe validation first (fashion.probe.validate_candidate,
with MIN_PROBE_ACCURACY, MAX_PROBE_DROP and MIN_PROBE_AGREEMENT from the environment, as the
service reads them), and is installed with fashion.checkpoint's commit, so a running service
follows through its hot reload and never sees half a pair. Exit status: 0 done or accepted; 1 the
model was refused (or there is nothing to roll back to); 2 bad input, with one line saying why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fashion import history
from fashion.bounds import argparse_type
from fashion.checkpoint import CARD_FILE, CheckpointError, load_judged
from fashion.probe import CandidateRejected, ProbeError, ValidationPolicy, validate_candidate

OK, REFUSED, BAD_INPUT = 0, 1, 2
INVALID_CHECKPOINT = "invalid_checkpoint"


class UsageError(Exception):
    """Bad input: the CLI prints the message on one line and exits 2."""


_positive = argparse_type(int, minimum=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fashion-models", description=__doc__.split("\n\n")[0])
    # On the main parser and on each command, so both `--model-dir D list` and `list --model-dir D` work.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model-dir", type=Path, default=argparse.SUPPRESS, help="the model folder (default models)")
    common.add_argument("--keep", type=_positive, default=argparse.SUPPRESS, help="archived models to keep (default 5)")
    parser.add_argument("--model-dir", type=Path, default=Path("models"), help="the model folder (default models)")
    parser.add_argument("--keep", type=_positive, default=history.DEFAULT_KEEP, help="archived models to keep")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", parents=[common], help="the current model and the archived ones")
    listing.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    promote = commands.add_parser("promote", parents=[common], help="validate and install a model")
    promote.add_argument("target", metavar="VERSION|PATH", help="an archived version or a model folder")
    commands.add_parser("rollback", parents=[common], help="install the model that served before the current one")
    validate = commands.add_parser("validate", parents=[common], help="score a model folder on the probe")
    validate.add_argument("path", type=Path, help="a model folder (model.json + model.safetensors)")
    validate.add_argument("--report", type=Path, help="also write the verdict as JSON to this file")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# --------------------------------------------------------------------------- helpers


def _policy() -> ValidationPolicy:
    try:
        return ValidationPolicy.from_env()
    except ValueError as error:
        raise UsageError(str(error)) from None


def _model_dir(args: argparse.Namespace) -> Path:
    model_dir = args.model_dir
    if model_dir.exists() and not model_dir.is_dir():
        raise UsageError(f"--model-dir {model_dir} is a file, not a folder")
    if not model_dir.exists():
        raise UsageError(f"--model-dir {model_dir} does not exist")
    return model_dir


def _model_folder(path: Path, what: str) -> Path:
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"{what} {path} is not a folder (expected one with {CARD_FILE} and model.safetensors)")
    return path


def judge(path: Path, policy: ValidationPolicy) -> dict:
    """The verdict on the model in ``path``: accepted, version, reason, message, measured."""
    try:
        model, card, _ = load_judged(path)  # as the service loads it: card and detector must agree too
    except CheckpointError as error:
        return {"accepted": False, "version": None, "reason": INVALID_CHECKPOINT, "message": str(error)}
    version = history.version_of(card)
    try:
        measured = validate_candidate(model, card, policy)
    except CandidateRejected as rejection:
        return {
            "accepted": False,
            "version": version,
            "reason": rejection.reason,
            "message": rejection.message,
            "measured": rejection.measured,
        }
    message = (
        f"probe accuracy {measured['accuracy']:.3f}, agreement with the card {measured['agreement']:.3f} "
        f"({measured['seconds'] * 1000:.0f} ms)"
    )
    return {"accepted": True, "version": version, "reason": None, "message": message, "measured": measured}


def _say(verdict: dict, what: str) -> None:
    if verdict["accepted"]:
        print(f"accepted: {what} version {verdict['version']}: {verdict['message']}")
    else:
        print(f"refused ({verdict['reason']}): {what} version {verdict['version'] or '?'}: {verdict['message']}")


def _claims(card: dict) -> tuple[float | None, float | None]:
    metrics = card.get("metrics") if isinstance(card.get("metrics"), dict) else {}
    probe = card.get("probe") if isinstance(card.get("probe"), dict) else {}
    return metrics.get("test_accuracy"), probe.get("accuracy")


# --------------------------------------------------------------------------- commands


def list_models(args: argparse.Namespace) -> int:
    model_dir = _model_dir(args)
    entries = []
    current = history.current_entry(model_dir)
    if current is not None:
        entries.append(current)
    entries += [entry for entry in history.archived_entries(model_dir)]
    rows = []
    for entry in entries:
        test, probe = _claims(entry.card)
        rows.append(
            {
                "version": entry.version,
                "current": entry.current,
                "path": str(entry.path),
                "test_accuracy": test,
                "probe_accuracy": probe,
                "created_at": entry.card.get("created_at"),
                "accepted_at": entry.accepted_at,
                "archived_at": entry.archived_at,
            }
        )
    if args.json:
        print(json.dumps({"model_dir": str(model_dir), "models": rows}, indent=2))
        return OK
    if not rows:
        print(f"no models in {model_dir}")
        return OK
    print(f"{'VERSION':<13} {'':<8} {'TEST':>6} {'PROBE':>6}  {'CREATED':<25} {'ACCEPTED':<25} ARCHIVED")
    for row in rows:
        test = f"{row['test_accuracy']:.4f}" if isinstance(row["test_accuracy"], int | float) else "-"
        probe = f"{row['probe_accuracy']:.3f}" if isinstance(row["probe_accuracy"], int | float) else "-"
        print(
            f"{row['version']:<13} {'current' if row['current'] else '':<8} {test:>6} {probe:>6}  "
            f"{row['created_at'] or '-':<25} {row['accepted_at'] or '-':<25} {row['archived_at'] or '-'}"
        )
    return OK


def _install(model_dir: Path, source: Path, how: str, keep: int, policy: ValidationPolicy) -> int:
    current = history.current_entry(model_dir)
    verdict = judge(source, policy)
    _say(verdict, str(source))
    if not verdict["accepted"]:
        return REFUSED
    if current is not None and current.version == verdict["version"]:
        print(f"{verdict['version']} is already the current model in {model_dir}")
        return OK
    try:
        weights, card_data, card = history.read_pair(source)
        history.install(model_dir, weights, card_data, how, keep, history.read_plots(source, card))
    except CheckpointError as error:  # the files changed between the validation and the copy
        print(f"refused ({INVALID_CHECKPOINT}): {error}")
        return REFUSED
    except OSError as error:
        raise UsageError(f"cannot install into {model_dir}: {error}") from None
    before = f" (was {current.version}, archived in {history.HISTORY_DIR}/)" if current is not None else ""
    print(f"{how}: {verdict['version']} is now the current model in {model_dir}{before}")
    return OK


def promote(args: argparse.Namespace) -> int:
    model_dir = _model_dir(args)
    policy = _policy()
    target = args.target
    if history.VERSION_PATTERN.fullmatch(target):
        entry = history.find(model_dir, target)
        if entry is not None:
            return _install(model_dir, entry.path, "promote", args.keep, policy)
        if not Path(target).exists():
            raise UsageError(f"no version {target} in {model_dir} or {history.history_dir(model_dir)}/")
    source = _model_folder(Path(target), "promote:")
    return _install(model_dir, source, "promote", args.keep, policy)


def rollback(args: argparse.Namespace) -> int:
    model_dir = _model_dir(args)
    policy = _policy()
    current = history.current_entry(model_dir)
    for entry in history.archived_entries(model_dir):
        if current is None or entry.version != current.version:
            return _install(model_dir, entry.path, "rollback", args.keep, policy)
    print(f"nothing to roll back to: {history.history_dir(model_dir)}/ holds no other model")
    return REFUSED


def validate(args: argparse.Namespace) -> int:
    policy = _policy()
    path = _model_folder(args.path, "validate:")
    verdict = {**judge(path, policy), "policy": policy.describe()}
    _say(verdict, str(path))
    if args.report:
        try:
            args.report.write_text(json.dumps(verdict, indent=2) + "\n")
        except OSError as error:
            raise UsageError(f"cannot write the report {args.report}: {error.strerror}") from None
    return OK if verdict["accepted"] else REFUSED


COMMANDS = {"list": list_models, "promote": promote, "rollback": rollback, "validate": validate}


def main(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"fashion-models: error: {error}", file=sys.stderr)
        return BAD_INPUT
    except ProbeError as error:
        print(f"fashion-models: error: {error}", file=sys.stderr)
        return BAD_INPUT


def run(argv: list[str] | None = None) -> int:
    """Console entry point."""
    return main(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
