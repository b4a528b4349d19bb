"""The accuracy gate (scripts/accuracy_gate.py) that scripts/retrain.sh and the CI workflow run."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("accuracy_gate", REPO / "scripts" / "accuracy_gate.py")
accuracy_gate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accuracy_gate)


def _card(tmp_path: Path, name: str, accuracy) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"metrics": {"test_accuracy": accuracy}}))
    return folder


@pytest.mark.parametrize(
    ("current", "new", "accepted"),
    [
        (0.9100, 0.9100, True),
        (0.9100, 0.9200, True),
        (0.9100, 0.9050, True),  # exactly 0.5 points below: still accepted
        (0.9100, 0.9049, False),
        (0.9100, 0.8481, False),
    ],
)
def test_accuracy_gate_refuses_more_than_half_a_point_below(tmp_path, current, new, accepted):
    args = accuracy_gate.parse_args(
        [str(_card(tmp_path, "current", current)), str(_card(tmp_path, "new", new)), "--report", str(tmp_path / "g")]
    )
    assert accuracy_gate.main(args) == (0 if accepted else 1)
    report = json.loads((tmp_path / "g").read_text())
    assert report["accepted"] is accepted
    assert report["new_test_accuracy"] == new and report["current_test_accuracy"] == current


def test_accuracy_gate_without_current_model_accepts_and_bad_cards_exit_2(tmp_path):
    new = _card(tmp_path, "new", 0.5)
    assert accuracy_gate.main(accuracy_gate.parse_args([str(tmp_path / "nothing"), str(new)])) == 0
    for bad in ('{"metrics": {}}', "not json", '{"metrics": {"test_accuracy": 91.0}}'):
        (new / "model.json").write_text(bad)
        assert accuracy_gate.main(accuracy_gate.parse_args([str(tmp_path / "nothing"), str(new)])) == 2
    assert accuracy_gate.main(accuracy_gate.parse_args([str(new), str(tmp_path / "missing")])) == 2


def _probe_report(tmp_path: Path, accepted: bool) -> Path:
    """What `fashion-models validate NEW --report FILE` writes (tests/test_trust.py runs the real command)."""
    report = tmp_path / f"validation-{accepted}.json"
    verdict = {"accepted": accepted, "version": "0123456789ab", "reason": None, "message": "probe accuracy 0.9"}
    if not accepted:
        verdict |= {"reason": "probe_accuracy_below_floor", "message": "probe accuracy 0.093 is below the floor 0.8"}
    report.write_text(json.dumps(verdict))
    return report


def test_gate_refuses_what_the_probe_validation_refused(tmp_path, capsys):
    current, new = _card(tmp_path, "current", 0.91), _card(tmp_path, "new", 0.92)  # better on the card
    for accepted in (True, False):
        probe = str(_probe_report(tmp_path, accepted))
        args = accuracy_gate.parse_args(
            [str(current), str(new), "--probe-report", probe, "--report", str(tmp_path / "g")]
        )
        assert accuracy_gate.main(args) == (0 if accepted else 1)
        report = json.loads((tmp_path / "g").read_text())
        assert report["accepted"] is accepted and report["probe_validation"]["accepted"] is accepted
    assert "refused by the probe validation (probe_accuracy_below_floor)" in capsys.readouterr().out
    # A missing or unreadable report is bad input, not a pass.
    for bad in (tmp_path / "missing.json", current / "model.json"):
        assert accuracy_gate.main(accuracy_gate.parse_args([str(current), str(new), "--probe-report", str(bad)])) == 2


_evaluate_spec = importlib.util.spec_from_file_location("evaluate", REPO / "scripts" / "evaluate.py")
evaluate_script = importlib.util.module_from_spec(_evaluate_spec)
_evaluate_spec.loader.exec_module(evaluate_script)


def test_independent_evaluation_agrees_with_the_bundled_card_and_catches_a_false_one(tmp_path, data_root, capsys):
    """scripts/evaluate.py scores the shipped model through torchvision's stock transforms, not the
    training code's data path, and must find the card's accuracy to the image; a card claiming one
    image more is refused."""
    bundled = REPO / "models"
    assert evaluate_script.main(evaluate_script.parse_args([str(bundled), "--data-dir", str(data_root)])) == 0
    card = json.loads((bundled / "model.json").read_text())
    assert f"accuracy {card['metrics']['test_accuracy']:.4f}" in capsys.readouterr().out

    lying = tmp_path / "lying"
    shutil.copytree(bundled, lying, ignore=shutil.ignore_patterns("history", "*.png"))
    card["metrics"]["test_accuracy"] = round(card["metrics"]["test_accuracy"] + 0.0001, 4)
    (lying / "model.json").write_text(json.dumps(card))
    assert evaluate_script.main(evaluate_script.parse_args([str(lying), "--data-dir", str(data_root)])) == 1
