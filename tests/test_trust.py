"""Model trust on a live server: bad candidates refused under load, promote, rollback, the pin, the CLIs."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from fashion import history
from fashion.checkpoint import CARD_FILE, load_judged, read_card, save_checkpoint
from fashion.contract import contract_summary
from fashion.probe import BELOW_CLAIM, BELOW_FLOOR, probe_record

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "models"
ANKLE_BOOT = (REPO / "examples" / "ankle-boot.png").read_bytes()
# Cards keep what a training run wrote; save_checkpoint adds these itself.
_WRITTEN_BY_SAVE = {"format", "name", "weights", *contract_summary()}


def _claims_of(card: dict) -> dict:
    return {key: value for key, value in card.items() if key not in _WRITTEN_BY_SAVE}


def save_candidate(directory: Path, change, card_change=None) -> str:
    """The bundled model with ``change`` applied to its layers, committed into ``directory`` with the bundled
    card's claims (or ``card_change``'s); the card's SHA-256 matches the new weights. Returns the version."""
    model, card, judge = load_judged(BUNDLED)
    with torch.no_grad():
        change(model)
    card = _claims_of(card)
    if card_change is not None:
        card_change(model, card)
    # The not-a-garment detector travels with the card's trust section that describes it.
    return save_checkpoint(model, card, directory, detector=judge.detector)["weights"]["sha256"][:12]


def noise(model) -> None:
    torch.manual_seed(1)
    for parameter in model.parameters():
        parameter.copy_(torch.randn_like(parameter) * 0.05)


def swapped_classes(model) -> None:
    """Every class's output row moved to the next class."""
    model[-1].weight.copy_(model[-1].weight.roll(1, dims=0))
    model[-1].bias.copy_(model[-1].bias.roll(1, dims=0))


def never_shirt(model) -> None:
    """Above the floor, about 8 points below the bundled model on the probe."""
    model[-1].bias[6] = -100.0


def slightly_different(model) -> None:
    """Different weights (a new version), the same answers to the probe's precision."""
    model[-1].bias.add_(1e-4)


def honest_record(model, card) -> None:
    card["probe"] = probe_record(model)


class Client(threading.Thread):
    """Posts the ankle boot over and over; records every status and the version that answered."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stopping = url, threading.Event()
        self.statuses: list[int] = []
        self.versions: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stopping.is_set():
                try:
                    response = session.post(
                        self.url + "/predict", data=ANKLE_BOOT, headers={"Content-Type": "image/png"}, timeout=30
                    )
                except requests.RequestException as error:
                    self.errors.append(repr(error))
                    continue
                self.statuses.append(response.status_code)
                if response.status_code == 200:
                    self.versions.append(response.json()["model"]["version"])

    def stop(self) -> Client:
        self.stopping.set()
        self.join(30)
        return self


def rejections(url: str) -> dict[str, float]:
    text = requests.get(url + "/metrics", timeout=10).text
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "fashion_model_rejections_total"
    }


def readyz_warning(url: str) -> str:
    return requests.get(url + "/readyz", timeout=10).json().get("warning", "")


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def served_version(url: str) -> str | None:
    response = requests.post(url + "/predict", data=ANKLE_BOOT, headers={"Content-Type": "image/png"}, timeout=30)
    return response.json()["model"]["version"] if response.status_code == 200 else None


@pytest.fixture
def model_dir(tmp_path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    for name in ("model.json", "model.safetensors"):
        shutil.copy2(BUNDLED / name, directory / name)
    return directory


def models_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``fashion-models`` in a child process, this checkout's code."""
    return subprocess.run(
        [sys.executable, "-m", "fashion.models_cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# --------------------------------------------------------------------------- refusals under load


def test_bad_candidates_are_refused_under_load(start_gunicorn, model_dir):
    good = read_card(model_dir)["weights"]["sha256"][:12]
    server = start_gunicorn(model_dir, env={"RELOAD_INTERVAL": "0.2"}, workers=2)
    client = Client(server.url)
    client.start()
    try:
        wait_for(lambda: len(client.versions) > 20, "the client's first answers")
        candidates = [
            ("noise weights, the bundled card's claims", noise, None, BELOW_FLOOR),
            ("classes swapped, the bundled card's claims", swapped_classes, None, BELOW_FLOOR),
            ("a card claiming the bundled model's accuracy", never_shirt, None, BELOW_CLAIM),
        ]
        for what, change, card_change, reason in candidates:
            before = rejections(server.url).get(reason, 0)
            version = save_candidate(model_dir, change, card_change)

            def refused(version=version):
                card = requests.get(server.url + "/model", timeout=10).json()
                return card if (card.get("candidate") or {}).get("version") == version else None

            card = wait_for(refused, f"/model to show {what} as the refused candidate")
            assert card["version"] == good and card["candidate"]["reason"] == reason, (what, card["candidate"])
            assert card["candidate"]["message"] and card["candidate"]["at"]
            ready = requests.get(server.url + "/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            # A worker that has not looked at the folder yet may answer without the warning; wait for one that has.
            wait_for(
                lambda reason=reason: (
                    reason in requests.get(server.url + "/readyz", timeout=10).json().get("warning", "")
                ),
                "/readyz's warning",
            )
            wait_for(lambda r=reason, b=before: rejections(server.url).get(r, 0) > b, f"the {reason} count to rise")
        # The refusals are in the log, one JSON line each, with the reason.
        logged = [json.loads(line) for line in server.log_text().splitlines() if '"candidate_version"' in line]
        assert {entry["reason"] for entry in logged} == {BELOW_FLOOR, BELOW_CLAIM}
        # Putting the good model back clears the warning.
        save_bundled(model_dir)
        wait_for(lambda: "warning" not in requests.get(server.url + "/readyz", timeout=10).json(), "the warning to go")
    finally:
        client.stop()
    assert client.errors == [] and set(client.statuses) == {200}, (client.errors, set(client.statuses))
    assert set(client.versions) == {good} and len(client.versions) > 100


def save_bundled(directory: Path) -> dict:
    """The bundled model committed into ``directory`` again, detector included."""
    model, card, judge = load_judged(BUNDLED)
    return save_checkpoint(model, _claims_of(card), directory, detector=judge.detector)


def test_a_refused_model_at_start_up_is_not_ready_with_the_reason(start_gunicorn, model_dir):
    save_candidate(model_dir, noise)
    server = start_gunicorn(model_dir, env={"RELOAD_INTERVAL": "0.2"})
    response = requests.get(server.url + "/readyz", timeout=10)
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "model_not_ready" and BELOW_FLOOR in error["message"]
    assert requests.post(server.url + "/predict", data=ANKLE_BOOT, timeout=10).status_code == 503
    assert rejections(server.url) == {BELOW_FLOOR: 1.0}


def test_a_restarted_worker_falls_back_to_the_last_archived_model(start_gunicorn, model_dir, tmp_path):
    """A worker with no model in memory (as after gunicorn recycles it) serves the newest archived model
    that passes, instead of going unready because a refused candidate sits in the folder."""
    good = read_card(model_dir)["weights"]["sha256"][:12]
    history.archive_current(model_dir)
    save_candidate(model_dir, swapped_classes)
    server = start_gunicorn(model_dir, env={"RELOAD_INTERVAL": "0.2"})
    ready = requests.get(server.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and BELOW_FLOOR in ready.json()["warning"]
    assert served_version(server.url) == good


# --------------------------------------------------------------------------- promote, rollback, pin


def test_promote_and_rollback_on_a_live_server(start_gunicorn, model_dir, tmp_path):
    first = read_card(model_dir)["weights"]["sha256"][:12]
    second = save_candidate(tmp_path / "second", slightly_different, honest_record)
    bad = save_candidate(tmp_path / "bad", noise)
    server = start_gunicorn(model_dir, env={"RELOAD_INTERVAL": "0.2"}, workers=1)
    client = Client(server.url)
    client.start()
    try:
        promoted = models_cli("--model-dir", str(model_dir), "promote", str(tmp_path / "second"))
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        wait_for(lambda: served_version(server.url) == second, "the promoted model to be served")
        assert (model_dir / "history" / first / CARD_FILE).is_file()

        refused = models_cli("--model-dir", str(model_dir), "promote", str(tmp_path / "bad"))
        assert refused.returncode == 1 and f"refused ({BELOW_FLOOR})" in refused.stdout, refused.stdout
        assert read_card(model_dir)["weights"]["sha256"][:12] == second
        assert not (model_dir / "history" / bad).exists()

        listed = json.loads(models_cli("--model-dir", str(model_dir), "list", "--json").stdout)
        assert [(m["version"], m["current"]) for m in listed["models"]] == [(second, True), (first, False)]
        assert listed["models"][0]["accepted_at"] and listed["models"][1]["archived_at"]

        back = models_cli("--model-dir", str(model_dir), "rollback")
        assert back.returncode == 0, back.stdout + back.stderr
        wait_for(lambda: served_version(server.url) == first, "the rolled-back model to be served")
        # Rolling back again returns to the model that served before this one.
        assert models_cli("--model-dir", str(model_dir), "rollback").returncode == 0
        wait_for(lambda: served_version(server.url) == second, "the second rollback")
        # Promote by version, from the history.
        assert models_cli("--model-dir", str(model_dir), "promote", first).returncode == 0
        wait_for(lambda: served_version(server.url) == first, "the promotion by version")
    finally:
        client.stop()
    assert client.errors == [] and set(client.statuses) == {200}
    assert set(client.versions) == {first, second}


def test_promote_and_rollback_carry_each_models_plots(model_dir, tmp_path):
    """The folder's plots are always the current card's: promote brings the new model's and removes the
    old ones it does not name, the history keeps each model's, and rollback brings them back."""
    first = read_card(model_dir)["weights"]["sha256"][:12]
    first_plots = {name: (BUNDLED / name).read_bytes() for name in read_card(BUNDLED)["plots"]}
    assert set(first_plots) == {"training-curves.png", "confusion-matrix.png"}
    for name, data in first_plots.items():
        (model_dir / name).write_bytes(data)
    curves = b"\x89PNG the second model's curves"
    planted = {"training-curves.png": curves, "../escape.png": b"\x89PNG beside the folder, not in it"}

    def with_plots(model, card) -> None:
        honest_record(model, card)
        # Only the curves; a name outside the folder is ignored, never read or written.
        card["plots"] = {name: hashlib.sha256(data).hexdigest() for name, data in planted.items()}

    second = save_candidate(tmp_path / "second", slightly_different, with_plots)
    (tmp_path / "second" / "training-curves.png").write_bytes(curves)
    (tmp_path / "escape.png").write_bytes(planted["../escape.png"])

    promoted = models_cli("--model-dir", str(model_dir), "promote", str(tmp_path / "second"))
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert read_card(model_dir)["weights"]["sha256"][:12] == second
    assert (model_dir / "training-curves.png").read_bytes() == curves
    assert not (model_dir / "confusion-matrix.png").exists()  # the first model's, which the new card does not name
    archived = model_dir / "history" / first
    assert {name: (archived / name).read_bytes() for name in first_plots} == first_plots

    back = models_cli("--model-dir", str(model_dir), "rollback")
    assert back.returncode == 0, back.stdout + back.stderr
    assert read_card(model_dir)["weights"]["sha256"][:12] == first
    assert {name: (model_dir / name).read_bytes() for name in first_plots} == first_plots
    assert (model_dir / "history" / second / "training-curves.png").read_bytes() == curves
    assert not (model_dir / "history" / "escape.png").exists()  # what "../escape.png" would have written


def test_model_version_pins_the_service(start_gunicorn, model_dir, tmp_path):
    first = read_card(model_dir)["weights"]["sha256"][:12]
    save_candidate(tmp_path / "second", slightly_different, honest_record)
    assert models_cli("--model-dir", str(model_dir), "promote", str(tmp_path / "second")).returncode == 0
    pinned = start_gunicorn(model_dir, env={"MODEL_VERSION": first, "RELOAD_INTERVAL": "0.2"})
    assert served_version(pinned.url) == first
    assert requests.get(pinned.url + "/model", timeout=10).json()["pinned"] == first
    missing = start_gunicorn(model_dir, env={"MODEL_VERSION": "0123456789ab"})
    error = requests.get(missing.url + "/readyz", timeout=10).json()["error"]
    assert "MODEL_VERSION=0123456789ab" in error["message"]
    bad = start_gunicorn(model_dir, env={"MODEL_VERSION": "latest"}, wait=None)
    assert bad.process.wait(60) == 2
    assert "configuration error: MODEL_VERSION='latest'" in bad.log_text()


# --------------------------------------------------------------------------- the CLIs on bad input


@pytest.mark.cli
@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["promote", "0123456789ab"], {}, "no version 0123456789ab"),
        (["promote", "no/such/folder"], {}, "does not exist"),
        (["validate", "README.md"], {}, "is not a folder"),
        (["--model-dir", "no/such/dir", "list"], {}, "does not exist"),
        (["--model-dir", "README.md", "rollback"], {}, "is a file, not a folder"),
        (["validate", "models"], {"MIN_PROBE_ACCURACY": "high"}, "MIN_PROBE_ACCURACY='high'"),
        (["--keep", "0", "list"], {}, "must be at least 1"),
        (["demote"], {}, "invalid choice"),
    ],
)
def test_models_cli_bad_input_exits_2_with_one_clear_line(args, env, fragment):
    result = models_cli(*args, env=env)
    assert result.returncode == 2, result
    assert fragment in result.stderr and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith("fashion-models: error:")


@pytest.mark.cli
def test_models_cli_validate_accepts_and_refuses(tmp_path):
    accepted = models_cli("validate", "models", "--report", str(tmp_path / "ok.json"))
    assert accepted.returncode == 0 and accepted.stdout.startswith("accepted:"), accepted
    assert json.loads((tmp_path / "ok.json").read_text())["accepted"] is True
    save_candidate(tmp_path / "noise", noise)
    refused = models_cli("validate", str(tmp_path / "noise"), "--report", str(tmp_path / "no.json"))
    assert refused.returncode == 1 and refused.stdout.startswith(f"refused ({BELOW_FLOOR})"), refused
    report = json.loads((tmp_path / "no.json").read_text())
    assert report["accepted"] is False and report["reason"] == BELOW_FLOOR
    # An inconsistent pair is refused too, not a crash.
    card = copy.deepcopy(read_card(tmp_path / "noise"))
    card["weights"]["sha256"] = "0" * 64
    (tmp_path / "noise" / CARD_FILE).write_text(json.dumps(card))
    broken = models_cli("validate", str(tmp_path / "noise"))
    assert broken.returncode == 1 and "refused (invalid_checkpoint)" in broken.stdout


@pytest.mark.cli
def test_fashion_serve_and_train_entry_points_check_their_input():
    serve = subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PORT": "eighty"},
    )
    assert serve.returncode == 2 and "configuration error: PORT='eighty'" in serve.stderr
    train = subprocess.run(
        [sys.executable, "-c", "import sys; from training.cli import main; sys.exit(main())", "--epochs", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert train.returncode == 2 and "--epochs" in train.stderr
