"""fashion-predict: the service's answers from the command line, on real files and on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testing.models import TOY_MODEL_ENV, random_model_dir
from testing.ood import ood_samples

pytestmark = pytest.mark.cli
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXPECTED = {
    "ankle-boot": "Ankle boot",
    "ankle-boot-photo": "Ankle boot",
    "bag": "Bag",
    "dress": "Dress",
    "sneaker": "Sneaker",
    "t-shirt": "T-shirt/top",
    "trouser": "Trouser",
}


def fashion_predict(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "fashion.predict", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_real_files_as_json_match_the_service(bundled_server):
    import requests

    files = sorted(p for p in EXAMPLES.iterdir() if p.stem in EXPECTED)
    result = fashion_predict(*map(str, files), "--json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["label"] for a in answers] == [EXPECTED[p.stem] for p in files]
    for path, answer in zip(files, answers, strict=True):
        assert answer["uncertain"] is False and len(answer["top_k"]) == 3
        served = requests.post(
            f"{bundled_server.url}/predict?top_k=3",
            data=path.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
        ).json()
        # The same preprocessing, model and judge: the same numbers as the server's answer.
        for key in ("label", "class_id", "uncertain"):
            assert answer[key] == served[key], key
        assert answer["calibrated_confidence"] == pytest.approx(served["calibrated_confidence"], abs=1e-6)
        assert answer["probabilities"] == pytest.approx(served["probabilities"], abs=1e-6)


def test_a_reader_that_stops_early_gets_no_traceback():
    # More answers than a pipe holds (64 KB), so the writes after the reader leaves fail with EPIPE.
    import os

    boot = str(EXAMPLES / "ankle-boot.png")
    process = subprocess.Popen(
        [sys.executable, "-m", "fashion.predict", *[boot] * 200, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    first = process.stdout.readline()
    process.stdout.close()
    _, errors = process.communicate(timeout=120)
    assert json.loads(first)["label"] == "Ankle boot"
    assert process.returncode == 141, errors
    assert errors == b""


def test_text_output_says_when_it_is_not_a_garment(tmp_path):
    photo = tmp_path / "photo.img"
    photo.write_bytes(ood_samples(names=["photos"], per_set=1)["photos"][0])
    result = fashion_predict(str(EXAMPLES / "bag.png"), str(photo))
    assert result.returncode == 0, result.stderr
    bag, other = result.stdout.splitlines()
    assert bag.startswith(f"{EXAMPLES / 'bag.png'}: Bag (") and "uncertain" not in bag
    assert other.startswith(f"{photo}: ") and other.endswith("uncertain: not a garment")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent.png"], "/nonexistent.png: cannot be read: No such file or directory"),
        ([__file__], "not an image in a supported format"),
        ([str(EXAMPLES / "bag.png"), "--top-k", "11"], "--top-k must be between 0 and 10"),
        ([str(EXAMPLES / "bag.png"), "--model-dir", "/tmp"], "no model card"),
        ([], "the following arguments are required: IMAGE"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(args, message):
    result = fashion_predict(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_model_the_service_would_refuse_is_refused_here_too(tmp_path):
    toy = random_model_dir(tmp_path / "toy")  # honest card, but about 10% accurate
    refused = fashion_predict(str(EXAMPLES / "bag.png"), "--model-dir", str(toy))
    assert refused.returncode == 2 and "probe_accuracy_below_floor" in refused.stderr
    allowed = fashion_predict(str(EXAMPLES / "bag.png"), "--model-dir", str(toy), env=TOY_MODEL_ENV)
    assert allowed.returncode == 0, allowed.stderr
