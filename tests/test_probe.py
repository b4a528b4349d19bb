"""The probe set and the validation rule (fashion/probe.py), in process."""

from __future__ import annotations

import copy

import pytest
import torch

from fashion.checkpoint import load_checkpoint
from fashion.contract import ModelConfig, build_model
from fashion.heldout import held_out_indices
from fashion.probe import (
    BELOW_CLAIM,
    BELOW_FLOOR,
    INVALID_PROBE_RECORD,
    NO_PROBE_RECORD,
    PREDICTIONS_MISMATCH,
    PROBE_FILE,
    PROBE_MISMATCH,
    CandidateRejected,
    ValidationPolicy,
    load_probe,
    probe_record,
    probe_tensors,
    validate_candidate,
    write_probe,
)


def test_probe_file_is_the_held_out_images_of_the_training_split(train_set, tmp_path):
    probe = load_probe()
    indices = held_out_indices(train_set.targets)[0]
    assert torch.equal(probe.indices, indices) and len(indices) == 1000
    assert torch.equal(probe.images, train_set.data[indices])
    assert torch.equal(probe.labels, train_set.targets[indices])
    assert torch.bincount(probe.labels).tolist() == [100] * 10
    # scripts/make_probe.py's steps give the shipped file byte for byte (its hash is what cards name).
    digest = write_probe(tmp_path / "probe.safetensors", *probe_tensors(train_set.data, train_set.targets))
    assert (tmp_path / "probe.safetensors").read_bytes() == PROBE_FILE.read_bytes()
    assert digest == probe.sha256


@pytest.fixture(scope="module")
def bundled():
    model, card = load_checkpoint("models")
    return model, card


def test_bundled_model_is_accepted_with_its_recorded_figures(bundled):
    model, card = bundled
    record = probe_record(model)
    assert record == card["probe"]
    assert set(record) == {"images", "sha256", "accuracy", "predictions"} and len(record["predictions"]) == 1000
    measured = validate_candidate(model, card)
    assert measured["accuracy"] == record["accuracy"] and measured["agreement"] == 1.0
    assert 0 < measured["seconds"] < 5


def _changed_predictions(predictions: str, count: int) -> str:
    digits = list(predictions)
    for i in range(count):
        digits[i] = str((int(digits[i]) + 1) % 10)
    return "".join(digits)


def _changed(card: dict, count: int) -> str:
    return _changed_predictions(card["probe"]["predictions"], count)


def _rejected(model, card, policy=None) -> CandidateRejected:
    with pytest.raises(CandidateRejected) as refused:
        validate_candidate(model, card, policy)
    return refused.value


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda card: card.pop("probe"), NO_PROBE_RECORD),
        (lambda card: card.update(probe="yes"), INVALID_PROBE_RECORD),
        (lambda card: card["probe"].update(sha256="0" * 64), PROBE_MISMATCH),
        (lambda card: card["probe"].update(predictions="123"), INVALID_PROBE_RECORD),
        (lambda card: card["probe"].update(accuracy=1.5), INVALID_PROBE_RECORD),
        # A card recorded on other weights: 2% of the predictions differ.
        (lambda card: card["probe"].update(predictions=_changed(card, 20)), PREDICTIONS_MISMATCH),
    ],
)  # fmt: skip
def test_each_rule_refuses_a_card_that_does_not_hold(bundled, change, reason):
    model, card = bundled
    card = copy.deepcopy(card)
    change(card)
    refused = _rejected(model, card)
    assert refused.reason == reason, refused
    assert refused.message


def never_shirt(model):
    """The model with its "Shirt" output pinned far down: still above the floor, clearly worse."""
    worse = copy.deepcopy(model)
    with torch.no_grad():
        worse[-1].bias[6] = -100.0
    return worse


def test_a_card_claiming_more_than_its_weights_do_is_refused(bundled):
    model, card = bundled
    worse = never_shirt(model)
    record = probe_record(worse)
    # Honest: its own probe record, and a test accuracy its weights can back.
    honest = {**card, "probe": record, "metrics": {**card["metrics"], "test_accuracy": record["accuracy"]}}
    assert 0.80 < honest["probe"]["accuracy"] < card["probe"]["accuracy"] - 0.03
    # The bundled model's claims on the worse weights: the recorded probe accuracy, then the test accuracy.
    assert _rejected(worse, {**card}).reason == BELOW_CLAIM
    lie = copy.deepcopy(honest)
    lie["metrics"]["test_accuracy"] = honest["probe"]["accuracy"] + 0.05
    refused = _rejected(worse, lie)
    assert refused.reason == BELOW_CLAIM and "test accuracy" in refused.message
    validate_candidate(worse, honest)


def test_tolerances_are_the_policys(bundled):
    model, card = bundled
    worse = never_shirt(model)
    card = {**card, "probe": probe_record(worse), "metrics": {}}
    measured = card["probe"]["accuracy"]
    # Near-ties that another device may break differently: 0.5% disagreement passes the 0.99 default.
    card["probe"]["predictions"] = _changed_predictions(card["probe"]["predictions"], 5)
    assert validate_candidate(worse, card)["agreement"] == 0.995
    assert _rejected(worse, card, ValidationPolicy(min_agreement=1.0)).reason == PREDICTIONS_MISMATCH
    # Exactly MAX_PROBE_DROP below the claim is allowed; a thousandth more is not.
    card["probe"]["accuracy"] = measured + 0.03
    validate_candidate(worse, card)
    card["probe"]["accuracy"] = measured + 0.031
    assert _rejected(worse, card).reason == BELOW_CLAIM
    validate_candidate(worse, card, ValidationPolicy(max_drop=0.05))
    assert _rejected(worse, card, ValidationPolicy(min_accuracy=0.99, max_drop=1)).reason == BELOW_FLOOR


def test_noise_and_swapped_classes_fall_below_the_floor(bundled):
    model, card = bundled
    noise = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in noise.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.05)
    refused = _rejected(noise, card)
    assert refused.reason == BELOW_FLOOR and refused.measured["accuracy"] < 0.3
    swapped = copy.deepcopy(model)
    with torch.no_grad():
        swapped[-1].weight.copy_(swapped[-1].weight.roll(1, dims=0))
        swapped[-1].bias.copy_(swapped[-1].bias.roll(1, dims=0))
    # With its own honest record it is still refused: the floor needs no trust in the card.
    assert _rejected(swapped, {**card, "probe": probe_record(swapped)}).reason == BELOW_FLOOR


def test_a_cnn_is_scored_too_and_training_mode_is_restored():
    torch.manual_seed(0)
    cnn = build_model(ModelConfig(kind="cnn", channels=(8, 16), hidden_sizes=(32,), dropout=0.25))
    cnn.train()
    record = probe_record(cnn)
    assert cnn.training  # probe_record scored in eval mode and put the mode back
    measured = validate_candidate(cnn, {"probe": record}, ValidationPolicy(min_accuracy=0.0))
    assert measured["agreement"] == 1.0 and measured["accuracy"] == record["accuracy"]


def test_policy_from_environment():
    assert ValidationPolicy.from_env({}) == ValidationPolicy(0.80, 0.03, 0.99)
    policy = ValidationPolicy.from_env({"MIN_PROBE_ACCURACY": "0.5", "MAX_PROBE_DROP": "0", "MIN_PROBE_AGREEMENT": "1"})
    assert policy == ValidationPolicy(0.5, 0.0, 1.0)
    for name, raw in (("MIN_PROBE_ACCURACY", "high"), ("MAX_PROBE_DROP", "-0.1"), ("MIN_PROBE_AGREEMENT", "1.5")):
        with pytest.raises(ValueError, match=name):
            ValidationPolicy.from_env({name: raw})
