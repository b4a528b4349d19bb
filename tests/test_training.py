"""The training pipeline on the real data: datasets, loop, outputs, crash safety, CLI errors, shipped model."""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import platform
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import training.train as train_module
from fashion.bounds import parse_bounded
from fashion.checkpoint import (
    CARD_FILE,
    PREVIOUS_WEIGHTS_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    read_card,
    save_checkpoint,
)
from fashion.contract import CLASS_NAMES, FEATURE_TRANSFORM, MEAN, NUM_CLASSES, STD, ModelConfig, build_model
from fashion.probe import ValidationPolicy, probe_record, validate_candidate
from training.data import (
    DataError,
    ImageFolderDataset,
    TensorBatchDataset,
    collate_batch,
    ensure_fashion_mnist,
    file_checksums,
    raw_folder,
)
from training.dropout import BitsDropout, dropout_widths, use_bits_dropout
from training.prefetch import prefetched
from training.train import (
    CONFUSION_FILE,
    CURVES_FILE,
    RECIPES,
    TrainConfig,
    choose_mode,
    clear_leader,
    config_from_args,
    evaluate,
    fast_bf16,
    freeze_all_but_last,
    main,
    mix_up,
    one_cycle,
    parse_args,
    random_erase,
    random_shift,
    relu_in_place,
    shift_by_gather,
    shift_by_windows,
    threads_kept,
    train,
    write_outputs,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "models"


def run_cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def small_run(data_root: Path, output_dir: Path, *more: str) -> list[str]:
    """CLI arguments for a one-epoch run on 500 real images with a 16-unit model."""
    return [
        *("--data-dir", str(data_root), "--epochs", "1", "--limit-train", "500", "--hidden-sizes", "16"),
        *("--no-download", "--output-dir", str(output_dir), *more),
    ]


def subset(dataset, n: int) -> TensorBatchDataset:
    part = TensorBatchDataset([dataset])
    part.inputs, part.target_vectors = part.inputs[:n], part.target_vectors[:n]
    return part


# --------------------------------------------------------------------------- data


def test_fast_dataset_equals_torchvision_per_item_transform(train_set):
    indices = [0, 1, 59_999, *torch.randint(0, 60_000, (200,), generator=torch.Generator().manual_seed(0)).tolist()]
    for i in indices:
        image, target = train_set.per_item(i)  # PIL -> FEATURE_TRANSFORM, label -> one_hot
        fast_image, fast_target = train_set[i]
        assert torch.equal(image, fast_image)
        assert torch.equal(target, fast_target)
    batch_images, batch_targets = train_set.__getitems__(indices)
    assert torch.equal(batch_images, torch.stack([train_set[i][0] for i in indices]))
    assert torch.equal(batch_targets, torch.stack([train_set[i][1] for i in indices]))
    assert train_set.transform is FEATURE_TRANSFORM


def test_targets_are_one_hot_and_match_labels(train_set):
    targets = train_set.target_vectors
    assert targets.shape == (60_000, NUM_CLASSES) and targets.dtype == torch.float32
    assert torch.equal(targets.sum(dim=1), torch.ones(60_000))
    assert torch.equal(targets.argmax(dim=1), train_set.targets)
    assert torch.bincount(train_set.targets).tolist() == [6_000] * NUM_CLASSES


def test_dataloader_fetches_whole_batches(train_set):
    loader = DataLoader(subset(train_set, 1_000), batch_size=256, shuffle=True, collate_fn=collate_batch)
    shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in loader]
    assert shapes[0] == ((256, 1, 28, 28), (256, NUM_CLASSES))
    assert sum(s[0][0] for s in shapes) == 1_000


def test_debian_files_decompress_to_the_same_data(tmp_path, data_root):
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not (debian / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("the dataset-fashion-mnist package is not installed")
    root, source = ensure_fashion_mnist(tmp_path, debian_dir=debian, download=False)
    assert source == "debian"
    assert file_checksums(root) == file_checksums(data_root)
    assert not [p for p in raw_folder(root).iterdir() if p.name.endswith(".tmp-write")]
    assert ensure_fashion_mnist(tmp_path, debian_dir=tmp_path / "none", download=False)[1] == "data-root"


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_folder(root: Path, test_set) -> Path:
    """A small user data set: real test images in several formats, sizes and modes."""
    (root / "T-shirt_top").mkdir(parents=True)
    (root / "ankle boot").mkdir()
    (root / "Sneaker").mkdir()
    (root / "T-shirt_top" / "a.png").write_bytes(_png(Image.fromarray(test_set.data[1].numpy(), mode="L")))
    shirt = Image.fromarray(255 - test_set.data[1].numpy(), mode="L").resize((300, 300)).convert("RGB")
    (root / "T-shirt_top" / "photo.jpg").write_bytes(_png(shirt, "JPEG"))
    (root / "ankle boot" / "boot.webp").write_bytes(
        _png(Image.fromarray(test_set.data[0].numpy()).convert("RGBA"), "WEBP")
    )
    (root / "Sneaker" / "s.bmp").write_bytes(_png(Image.new("RGB", (40, 90), (250, 250, 250)), "BMP"))
    (root / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    return root


def test_image_folder_dataset_reads_any_format(tmp_path, test_set):
    dataset = ImageFolderDataset(make_folder(tmp_path / "extra", test_set))
    assert len(dataset) == 4
    labels = [CLASS_NAMES[int(y.argmax())] for _, y in (dataset[i] for i in range(len(dataset)))]
    assert labels == ["Sneaker", "T-shirt/top", "T-shirt/top", "Ankle boot"]
    assert dataset.inputs.shape == (4, 1, 28, 28)
    # A 28x28 grayscale PNG goes through exactly the training transform.
    index = [f.name for f, _ in dataset.samples].index("a.png")
    assert torch.equal(dataset[index][0], test_set.inputs[1])
    assert set(dataset.checksums()) == {
        "T-shirt_top/a.png",
        "T-shirt_top/photo.jpg",
        "ankle boot/boot.webp",
        "Sneaker/s.bmp",
    }
    photo = dataset.root / "T-shirt_top" / "photo.jpg"
    assert dataset.checksums()["T-shirt_top/photo.jpg"] == hashlib.sha256(photo.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("layout", "named"),
    [
        ({"Jacket/x.png": "png"}, "Jacket"),
        ({"Coat/": None}, "Coat"),
        ({"Coat/broken.png": b"\x89PNG\r\n\x1a\nnot really"}, "broken.png"),
        ({"Coat/notes.txt": b"hello"}, "notes.txt"),
        ({"Coat/empty.png": b""}, "empty.png"),
        ({"loose.png": "png"}, "loose.png"),
        ({}, "no class folders"),
    ],
)
def test_image_folder_dataset_rejects_bad_folders_up_front(tmp_path, layout, named):
    root = tmp_path / "extra"
    root.mkdir()
    good = _png(Image.new("L", (28, 28), 0))
    for relative, content in layout.items():
        path = root / relative
        if content is None:
            path.mkdir(parents=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(good if content == "png" else content)
    with pytest.raises(DataError, match=named):
        ImageFolderDataset(root)


# --------------------------------------------------------------------------- training


def test_short_training_on_a_real_subset_beats_chance(train_set, test_set):
    model = build_model(ModelConfig(hidden_sizes=(128,)))
    config = TrainConfig(epochs=2, batch_size=128, lr=3e-3, hflip=0.0, shift_after=0)
    before, _, _ = evaluate(model, test_set.inputs, test_set.targets)
    history = train(model, subset(train_set, 4_000), test_set, config, torch.device("cpu"), log=lambda _: None)
    assert all(layer.inplace for layer in model if isinstance(layer, torch.nn.ReLU))
    assert before < 0.25
    assert len(history) == 2 and history[-1]["test_accuracy"] > 0.70  # chance is 0.10
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_the_shift_starts_after_its_unshifted_epochs(train_set, test_set):
    """--shift-after N: the first N epochs train on the images as they are, the rest shifted (and mixed up)."""

    def trained(**recipe) -> dict:
        torch.manual_seed(2)
        model = build_model(ModelConfig(hidden_sizes=(32,)))
        config = TrainConfig(epochs=2, batch_size=100, seed=2, bf16=False, threads=1, ema=0.0, **recipe)
        train(model, subset(train_set, 500), test_set, config, torch.device("cpu"), log=lambda _: None)
        return model.state_dict()

    unshifted = trained(shift=0)
    held_back = trained(shift=1, shift_after=2)  # both epochs before the shift starts
    second_epoch_shifted = trained(shift=1, shift_after=1)
    assert all(torch.equal(unshifted[k], held_back[k]) for k in unshifted)
    assert not all(torch.equal(unshifted[k], second_epoch_shifted[k]) for k in unshifted)
    # Mixup is held back with the shift, and the loop mixes once it starts.
    mixup_held_back = trained(shift=0, mixup=0.2, shift_after=2)
    second_epoch_mixed = trained(shift=0, mixup=0.2, shift_after=1)
    assert all(torch.equal(unshifted[k], mixup_held_back[k]) for k in unshifted)
    assert not all(torch.equal(unshifted[k], second_epoch_mixed[k]) for k in unshifted)
    recipe = TrainConfig(shift=1, shift_after=20, mixup=0.2)
    assert [train_module.epoch_recipe(recipe, epoch).shift for epoch in (1, 20, 21, 120)] == [0, 0, 1, 1]
    assert [train_module.epoch_recipe(recipe, epoch).mixup for epoch in (1, 20, 21, 120)] == [0, 0, 0.2, 0.2]
    assert RECIPES["mlp"].shift_after == 20 and RECIPES["cnn"].shift_after == 0
    assert RECIPES["mlp"].mixup == 0.2 and RECIPES["cnn"].mixup == 0.0  # the CNN's 0.93 was measured without
    assert config_from_args(parse_args(["--shift-after", "5"])).shift_after == 5


def test_random_shift_translates_within_bounds():
    images = torch.full((64, 1, 28, 28), -1.0)
    images[:, 0, 10, 20] = 5.0  # one bright pixel per image
    shifted = random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    bright = (shifted == 5.0).nonzero()[:, 2:]
    assert len(bright) == 64  # still exactly one bright pixel in each image
    assert bright[:, 0].sub(10).abs().max() <= 2 and bright[:, 1].sub(20).abs().max() <= 2
    assert len({tuple(p) for p in bright.tolist()}) > 10  # and the offsets vary
    background = torch.tensor((0.0 - MEAN) / STD).item()  # what the padding brings in: normalized black
    assert set(shifted.unique().tolist()) <= {5.0, -1.0, background}


@pytest.mark.parametrize("shift", [1, 2])
def test_window_and_gather_shifts_make_the_same_images(shift):
    """The CPU's per-offset window copies and the GPU's gather: each image cropped at its own offset."""
    images = torch.randn(300, 1, 28, 28)
    padded = torch.nn.functional.pad(images, (shift,) * 4, value=-0.8)
    generator = torch.Generator().manual_seed(shift)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, 300), generator=generator)
    windows = shift_by_windows(padded, dy, dx, images.shape[-2:])
    assert torch.equal(windows, shift_by_gather(padded, dy, dx, images.shape[-2:]))
    for i in (0, 7, 299):
        top, left = int(dy[i]), int(dx[i])
        assert torch.equal(windows[i, 0], padded[i, 0, top : top + 28, left : left + 28])
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) == (2 * shift + 1) ** 2  # every offset used


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_bits_dropout_keeps_each_element_with_probability_1_minus_p(p):
    torch.manual_seed(0)
    inputs = torch.rand(2048, 512) + 0.5  # no zeros of its own
    dropped = BitsDropout(p).train()(inputs)
    kept = dropped != 0
    scale = 65536 / (65536 - round(p * 65536))
    torch.testing.assert_close(dropped[kept], inputs[kept] * scale)  # survivors scaled, as nn.Dropout does
    # 2^20 elements: the kept share is within 5 standard deviations of 1 - p, overall and in each of
    # the four 16-bit fields of a random word (a bare random_() leaves the fourth's sign bit clear,
    # which would keep every element in that field).
    for share in [kept.float().mean(), *kept.view(-1, 4).float().mean(dim=0)]:
        sigma = (p * (1 - p) / (kept.numel() / 4)) ** 0.5
        assert abs(share.item() - (1 - p)) < 5 * sigma
    assert dropped.mean().item() == pytest.approx(inputs.mean().item(), rel=0.01)  # unbiased in expectation


def test_bits_dropout_is_seeded_differs_per_call_and_passes_gradients_through_its_mask():
    inputs = torch.ones(64, 300, requires_grad=True)
    layer = BitsDropout(0.3).train()
    torch.manual_seed(7)
    first, second = layer(inputs), layer(inputs)
    torch.manual_seed(7)
    assert torch.equal(layer(inputs), first)
    assert not torch.equal(first, second)
    first.sum().backward()
    torch.testing.assert_close(inputs.grad, first.detach())  # d(x * mask)/dx = mask, the same mask
    assert torch.equal(BitsDropout(0.3).eval()(inputs), inputs)
    assert torch.equal(BitsDropout(0.0).train()(inputs), inputs)


def test_bits_dropout_swaps_in_without_changing_the_saved_model():
    config = ModelConfig(kind="mlp", hidden_sizes=(32, 16), dropout=0.2)
    model = build_model(config)
    plain = build_model(config)
    use_bits_dropout(model)
    assert [type(layer) for layer in model].count(BitsDropout) == 2
    plain.load_state_dict(model.state_dict())  # strict: the same keys, no state of its own
    images = torch.randn(5, 1, 28, 28)
    assert torch.equal(model.eval()(images), plain.eval()(images))


@pytest.mark.parametrize(
    "config",
    [ModelConfig(hidden_sizes=(32, 16)), ModelConfig(kind="cnn", channels=(4,), hidden_sizes=(8,), dropout=0.2)],
    ids=["mlp", "cnn"],
)
def test_relus_in_place_train_to_the_same_weights(config):
    # In place only after a Linear or a BatchNorm, whose backward passes do not read their outputs:
    # the same gradients, so the same weights after a few steps (exactly: the same kernels run).
    torch.manual_seed(3)
    plain = build_model(config).train()
    fast = relu_in_place(build_model(config).train())
    fast.load_state_dict(plain.state_dict())
    assert all(layer.inplace for layer in fast if isinstance(layer, torch.nn.ReLU))
    assert not any(layer.inplace for layer in plain if isinstance(layer, torch.nn.ReLU))
    images, targets = torch.randn(16, 1, 28, 28), torch.eye(NUM_CLASSES)[torch.arange(16) % NUM_CLASSES]
    kept = images.clone()
    for model in (plain, fast):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(3):
            torch.manual_seed(4)  # the same dropout masks in both
            train_module.optimizer_step(model, optimizer, images, targets, 0.1, False)
    assert torch.equal(images, kept)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, fast.state_dict()[name]), name


def test_a_relu_after_anything_else_keeps_its_copy():
    # After a Flatten (a view of the batch) an in-place ReLU would overwrite the training data.
    model = relu_in_place(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.ReLU(), torch.nn.Linear(784, 10)))
    assert not model[1].inplace
    images = torch.randn(4, 1, 28, 28)
    kept = images.clone()
    model(images)
    assert torch.equal(images, kept)


def test_mix_up_blends_each_image_and_target_with_one_partner_its_own_leading():
    """Known answers: image i is the constant i and its target one-hot class i % 10, so every blend
    says which two it came from and by what weight."""
    count = 200
    images = torch.arange(count, dtype=torch.float32).view(-1, 1, 1, 1).expand(count, 1, 28, 28).contiguous()
    targets = F.one_hot(torch.arange(count) % 10, 10).float()
    mixed, mixed_targets = mix_up(images, targets, 0.2, torch.Generator().manual_seed(0))
    assert mixed.shape == images.shape and mixed_targets.shape == targets.shape
    assert torch.equal(mixed, mixed[:, :, :1, :1].expand_as(mixed))  # one weight for the whole image
    assert torch.allclose(mixed_targets.sum(dim=1), torch.ones(count))
    own = mixed_targets[torch.arange(count), torch.arange(count) % 10]
    assert (own >= 0.5).all() and (own < 1).any()  # the image's own class leads; some are blended
    assert (mixed_targets.argmax(dim=1) == torch.arange(count) % 10).all()
    # value = w * i + (1 - w) * partner: the partner that the weight implies is a whole image index.
    weight = mixed_targets.max(dim=1).values
    blended = weight < 0.95  # closer to 1, the division below magnifies float32's rounding
    partner = (mixed[:, 0, 0, 0] - weight * torch.arange(count)) / (1 - weight)
    assert blended.sum() > 10 and torch.allclose(partner[blended], partner[blended].round(), atol=1e-2)
    # Beta(0.2, 0.2) puts most weights near 0 or 1: folded, most stay near 1.
    assert (weight > 0.9).float().mean() > 0.5
    again = mix_up(images, targets, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], mixed) and torch.equal(again[1], mixed_targets)  # the seed decides


def test_random_erase_blanks_one_rectangle_per_chosen_image():
    images = torch.full((200, 1, 28, 28), 3.0)
    erased = random_erase(images, 0.5, torch.Generator().manual_seed(0))
    background = torch.tensor((0.0 - MEAN) / STD).item()
    blanked = erased == background
    assert set(erased.unique().tolist()) <= {3.0, background}
    touched = blanked.flatten(1).any(dim=1)
    assert 60 < touched.sum() < 140  # about half the images
    for mask in blanked[touched, 0]:
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        # One solid rectangle: its bounding box is all blanked, 2-25% of the image (rounding aside).
        assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
        assert 10 <= mask.sum() <= 0.25 * 784 + 30


def test_choose_mode_times_each_candidate_and_leaves_the_run_untouched(train_set):
    # With dropout as train() runs it: a mode that prefetches draws the masks in its preparation.
    model = use_bits_dropout(build_model(ModelConfig(hidden_sizes=(64,), dropout=0.2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng, thread_count = torch.get_rng_state(), torch.get_num_threads()
    config = TrainConfig(batch_size=256)
    bf16, threads, record = choose_mode(
        model, train_set.inputs[:256], train_set.target_vectors[:256], config, torch.device("cpu")
    )
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is where it was
    assert torch.get_num_threads() == thread_count  # and so is torch's thread count, whichever mode ran last
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(layer.ahead for layer in model.modules() if isinstance(layer, BitsDropout))  # drawn on a copy
    timed = record["median_batch_ms"]
    assert record["by"] == "timed training steps" and record["chosen"] in timed
    # Every candidate took its two small steps; those far slower there were not timed further.
    assert set(record["scouted_step_ms"]) - {"images"} == set(timed) | set(record["dropped"])
    assert {name.split(",")[0] for name in [*timed, *record["dropped"]]} == {"fp32", "bf16"}
    assert timed[record["chosen"]] == min(timed.values())
    assert 1 <= record["rounds"] <= train_module.TIMED_ROUNDS
    # A batch costs its step and its preparation, which runs beside the step only with one thread.
    for name, batch_ms in timed.items():
        step_ms, preparation_ms = record["median_step_ms"][name], record["median_preparation_ms"][name]
        beside = name.endswith(", 1 thread") and train_module.usable_cpus() >= 2
        expected = max(step_ms, preparation_ms) if beside else step_ms + preparation_ms
        assert batch_ms == pytest.approx(expected, abs=0.02)
    assert (bf16, threads) in ((False, 1), (True, 1), (False, torch.get_num_threads()), (True, torch.get_num_threads()))
    # --no-bf16 --threads 1 leave nothing to measure.
    pinned = choose_mode(
        model,
        train_set.inputs[:8],
        train_set.target_vectors[:8],
        TrainConfig(bf16=False, threads=1),
        torch.device("cpu"),
    )
    assert pinned == (False, 1, {"chosen": "fp32, 1 thread", "by": "options"})


def test_clear_leader_only_when_its_slowest_batch_beats_every_others_fastest():
    assert clear_leader({"a": [1.0, 2.0, 3.0], "b": [3.5, 4.0, 9.0], "c": [5.0, 5.0, 5.0]})
    assert not clear_leader({"a": [1.0, 2.0, 3.0], "b": [2.9, 4.0, 9.0]})  # one batch of b's beat one of a's
    assert not clear_leader({"a": [1.0, 3.0], "b": [3.0, 3.0]})  # a tie is not clear
    assert clear_leader({"a": [7.0, 8.0], "b": [1.0, 2.0]})  # the leader need not come first


@pytest.mark.parametrize(("clear", "rounds"), [(True, train_module.CLEAR_AFTER), (False, train_module.TIMED_ROUNDS)])
def test_choose_mode_stops_timing_once_the_leader_is_clear(train_set, monkeypatch, clear, rounds):
    asked = []
    monkeypatch.setattr(train_module, "clear_leader", lambda costs: asked.append(costs) or clear)
    model = build_model(ModelConfig(hidden_sizes=(16,)))
    config = TrainConfig(batch_size=64)
    _, _, record = choose_mode(model, train_set.inputs[:64], train_set.target_vectors[:64], config, torch.device("cpu"))
    assert record["rounds"] == rounds
    # Asked from the CLEAR_AFTER-th round on, with every timed mode's batch costs so far.
    assert [len(next(iter(costs.values()))) for costs in asked] == list(range(train_module.CLEAR_AFTER, rounds + 1))
    timed = set(record["median_batch_ms"])
    assert all({train_module._mode_name(*mode) for mode in costs} == timed for costs in asked)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the caps name x86 instruction sets")
def test_choose_mode_drops_a_mode_far_slower_on_a_few_images():
    """bf16 on a CPU without bf16 instructions: capping the kernels at AVX2 makes this CPU one (an AVX2
    EPYC, say), where torch falls back to a bf16 product about 10x float32's. Timed at full size, such
    modes took the calibration to 1.1 s (the issue allows 1) and left too few images per step to tell
    1 thread from 2: the old code chose 1 thread in one run of three there, 40% slower a batch."""
    script = textwrap.dedent(
        """
        import json, torch
        from fashion.contract import build_model
        from training.train import TrainConfig, choose_mode
        # The 784-512-512-10: at the 256-wide default's shapes a 32-image step is mostly overhead, and
        # the fallback's 1-thread bf16 step came to 2.8x float32's, short of HOPELESS (timed, not dropped).
        config = TrainConfig(hidden_sizes=(512, 512))
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(2048, 1, 28, 28, generator=generator)
        targets = torch.nn.functional.one_hot(torch.randint(0, 10, (2048,), generator=generator), 10).float()
        model = build_model(config.model_config())
        print(json.dumps(choose_mode(model, inputs, targets, config, torch.device("cpu"))[2]))
        """
    )
    caps = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    env = {**os.environ, **caps, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.splitlines()[-1])
    scouted = record["scouted_step_ms"]
    assert scouted["images"] == train_module.SCOUT_IMAGES
    bf16_modes = [name for name in scouted if name.startswith("bf16")]
    assert bf16_modes and record["dropped"] == bf16_modes
    fastest = min(ms for name, ms in scouted.items() if name.startswith("fp32"))
    assert all(scouted[name] > train_module.HOPELESS * fastest for name in bf16_modes)
    assert record["chosen"].startswith("fp32") and all(name.startswith("fp32") for name in record["median_batch_ms"])


def test_arch_picks_its_recipe_and_options_override_it():
    cnn = config_from_args(parse_args(["--arch", "cnn", "--epochs", "2"]))
    assert cnn.arch == "cnn" and cnn.epochs == 2 and cnn.channels == RECIPES["cnn"].channels
    mlp = config_from_args(parse_args(["--no-bf16"]))
    assert mlp == TrainConfig(bf16=False)  # the shipped recipe is the dataclass default


@pytest.mark.parametrize(("warmup", "steps"), [(0.1, 10), (0.2, 5), (0.5, 2), (0.3, 10), (0.1, 1)])
def test_the_schedule_rises_then_anneals_for_any_warm_up(warmup, steps):
    """OneCycleLR alone divides by zero when the warm-up is exactly one step (0.1 of 10 steps)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = one_cycle(optimizer, 4e-3, steps, warmup)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps - 1):
        optimizer.step()
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert max(rates) <= 4e-3 * (1 + 1e-6)
    if steps > 2:  # it rises, then only falls, to far below where it started
        peak = rates.index(max(rates))
        assert peak > 0 and all(a >= b for a, b in itertools.pairwise(rates[peak:]))
        assert rates[-1] < rates[0] / 100


def test_same_seed_same_weights(train_set, test_set):
    def trained(seed: int) -> dict:
        torch.manual_seed(seed)
        model = build_model(ModelConfig(hidden_sizes=(32,)))
        # The mode pinned: which one the timed steps pick may differ between two runs on a busy machine.
        config = TrainConfig(
            epochs=1, batch_size=100, seed=seed, bf16=False, threads=1, hflip=0.5, shift=1, shift_after=0, ema=0.9
        )
        train(model, subset(train_set, 1_000), test_set, config, torch.device("cpu"), log=lambda _: None)
        return model.state_dict()

    first, again, other = trained(3), trained(3), trained(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_batches_prepared_on_a_second_thread_give_the_same_weights(train_set, test_set, monkeypatch, bf16):
    if bf16 and not fast_bf16(torch.device("cpu")):
        pytest.skip("this torch has no bf16 autocast on the CPU")
    architecture = ModelConfig(hidden_sizes=(32, 16), dropout=0.2)  # two dropout layers, masks drawn ahead

    def trained(cpus: int, threads: int | None = None) -> tuple[dict, dict]:
        monkeypatch.setattr(train_module, "usable_cpus", lambda: cpus)
        torch.manual_seed(5)
        model = build_model(architecture)
        config = TrainConfig(
            epochs=2,
            batch_size=96,
            seed=5,
            bf16=bf16,
            threads=threads,
            hflip=0.5,
            shift=1,
            shift_after=0,
            ema=0.9,
            dropout=0.2,
        )
        # With torch on one thread the only candidate is 1 thread, chosen (not pinned by --threads).
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            # 1,000 images in batches of 96: the last batch is smaller, and its masks are drawn for its size.
            history = train(model, subset(train_set, 1_000), test_set, config, torch.device("cpu"), log=lambda _: None)
        finally:
            torch.set_num_threads(before)
        assert not any(layer.ahead for layer in model.modules() if isinstance(layer, BitsDropout))
        return model.state_dict(), config.calibration, [entry["test_accuracy"] for entry in history]

    (serial, serial_record, serial_curve) = trained(1)
    (ahead, ahead_record, ahead_curve) = trained(2)
    assert serial_record["prefetch"] is False and ahead_record["prefetch"] is True
    # --threads 1 given: one CPU's worth of work, no second thread, even with a CPU to spare.
    (pinned, pinned_record, _) = trained(2, threads=1)
    assert pinned_record["prefetch"] is False and all(torch.equal(serial[k], pinned[k]) for k in serial)
    assert all(torch.equal(serial[k], ahead[k]) for k in serial)
    assert serial_curve == ahead_curve  # evaluated in the preparing thread's spare time, the same answers


@pytest.mark.parametrize("ema", [0.9, 0.0], ids=["ema", "no-ema"])
def test_a_stop_with_the_evaluation_behind_returns_the_weights_it_evaluated(train_set, test_set, monkeypatch, ema):
    # Prefetching, epoch 2's evaluation runs behind epoch 3: stopped at 2, the run has trained a third
    # epoch, but it returns epoch 2's weights and the history the serial loop gives.
    def trained(cpus: int) -> tuple[dict, list, list]:
        monkeypatch.setattr(train_module, "usable_cpus", lambda: cpus)
        torch.manual_seed(8)
        model = build_model(ModelConfig(hidden_sizes=(24,)))
        config = TrainConfig(
            epochs=5, batch_size=100, seed=8, bf16=False, ema=ema, hflip=0.0, dropout=0.0, shift_after=0
        )
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            history = train(
                model,
                subset(train_set, 600),
                test_set,
                config,
                torch.device("cpu"),
                log=lambda _: None,
                stop_when=lambda entry: entry["epoch"] == 2,
            )
        finally:
            torch.set_num_threads(before)
        assert config.calibration["prefetch"] is (cpus > 1)
        elapsed = [entry["elapsed_s"] for entry in history]
        return model.state_dict(), [entry["test_accuracy"] for entry in history], elapsed

    serial, serial_curve, _ = trained(1)
    behind, behind_curve, elapsed = trained(2)
    assert len(serial_curve) == 2 and behind_curve == serial_curve
    assert all(torch.equal(serial[k], behind[k]) for k in serial)
    assert 0 < elapsed[0] < elapsed[1]
    assert not any(thread.name == "batch-prefetch" for thread in threading.enumerate())


def test_prefetched_runs_spare_jobs_while_ahead_and_leaves_the_rest():
    ran = []

    def slowly_consumed(count: int, spare) -> list:
        taken = []
        for item in prefetched(iter(range(count)), depth=2, spare=spare):
            time.sleep(0.02)  # the consumer is the slow side: the queue fills, the producer has time to spare
            taken.append(item)
        return taken

    def job(number: int) -> None:
        time.sleep(0.005)
        ran.append(number)

    spare = (functools.partial(job, number) for number in range(1_000))
    assert slowly_consumed(10, spare) == list(range(10))
    assert ran and ran == list(range(len(ran))) and len(ran) < 1_000  # in order, one at a time, not all
    reached = len(ran)
    next(spare)()
    assert ran[-1] == reached  # the jobs it did not reach are still there, the next one first

    def failing_job():
        raise ValueError("spare job failed")

    with pytest.raises(ValueError, match="spare job failed"):
        slowly_consumed(10, iter([failing_job]))
    assert not any(thread.name == "batch-prefetch" for thread in threading.enumerate())


def test_dropout_masks_drawn_ahead_are_the_ones_the_forward_pass_would_draw():
    inputs = torch.rand(40, 24) + 0.5
    layer = BitsDropout(0.3).train()
    torch.manual_seed(11)
    inline = [layer(inputs), layer(inputs[:7])]
    torch.manual_seed(11)
    layer.draw_ahead((40, 24), torch.float32)
    layer.draw_ahead((7, 24), torch.float32)
    torch.manual_seed(99)  # the generator moves on: the queued masks are what counts
    assert torch.equal(layer(inputs), inline[0]) and torch.equal(layer(inputs[:7]), inline[1])
    assert not layer.ahead
    layer.draw_ahead((40, 24), torch.bfloat16)
    with pytest.raises(RuntimeError, match="drawn ahead"):
        layer(inputs)  # float32 inputs for a bf16 mask: the stream would be off, so it says so
    layer.eval().ahead.clear()
    layer.draw_ahead((40, 24), torch.float32)
    assert not layer.ahead  # nothing drawn for a layer that is the identity


def test_dropout_widths_follow_the_linear_before_each_dropout():
    mlp = use_bits_dropout(build_model(replace(RECIPES["mlp"], dropout=0.1).model_config()))
    cnn = use_bits_dropout(build_model(RECIPES["cnn"].model_config()))
    assert [width for _, width in dropout_widths(mlp)] == list(RECIPES["mlp"].hidden_sizes)
    assert [width for _, width in dropout_widths(cnn)] == list(RECIPES["cnn"].hidden_sizes)
    after_a_convolution = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), BitsDropout(0.1))
    assert dropout_widths(after_a_convolution) is None
    nested = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sequential(BitsDropout(0.1)))
    assert dropout_widths(nested) is None


def test_prefetched_keeps_order_raises_the_producers_error_and_stops_its_thread():
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad batch")

    seen = []
    with pytest.raises(ValueError, match="bad batch"):
        for item in prefetched(failing()):
            seen.append(item)
    assert seen == [1]

    drawn = []

    def endless():
        for number in itertools.count():
            drawn.append(number)
            yield number

    stream = prefetched(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()  # what a ``break`` out of the loop does
    assert not any(thread.name == "batch-prefetch" for thread in threading.enumerate())
    assert len(drawn) <= 3 + 2 + 1  # taken, queued, and the one in hand when told to stop


def test_save_load_round_trip_is_exact(tmp_path, test_set):
    model = build_model(ModelConfig(hidden_sizes=(64, 32)))
    card = {"architecture": ModelConfig(hidden_sizes=(64, 32)).to_dict(), "metrics": {"test_accuracy": 0.5}}
    written = write_outputs(model, card, tmp_path, {CURVES_FILE: b"png-1"})
    loaded, loaded_card = load_checkpoint(tmp_path)
    assert loaded_card == written == read_card(tmp_path)
    assert loaded_card["plots"][CURVES_FILE] == hashlib.sha256(b"png-1").hexdigest()
    with torch.no_grad():
        assert torch.equal(model.eval()(test_set.inputs[:500]), loaded(test_set.inputs[:500]))


def test_cli_trains_writes_card_and_fine_tunes_frozen(tmp_path, data_root):
    base = tmp_path / "base"
    args = ["--data-dir", str(data_root), "--epochs", "1", "--limit-train", "2000", "--no-download", "--seed", "1"]
    assert main(parse_args([*args, "--hidden-sizes", "64", "--output-dir", str(base)])) == 0
    card = read_card(base)
    assert card["architecture"]["hidden_sizes"] == [64]
    assert card["training"]["seed"] == 1 and card["training"]["epochs"] == 1
    assert card["data"]["train_images"] == 2000 and card["metrics"]["test_images"] == 10_000
    assert set(card["data"]["files_sha256"]) == {p.name for p in raw_folder(data_root).iterdir() if p.is_file()}
    assert sum(map(sum, card["metrics"]["confusion_matrix"]["counts"])) == 10_000
    assert set(card["metrics"]["per_class_accuracy"]) == set(CLASS_NAMES)
    assert (base / CURVES_FILE).stat().st_size > 1000 and (base / CONFUSION_FILE).stat().st_size > 1000
    assert card["versions"]["torch"] == torch.__version__ and card["created_at"]
    # The CPU by name, read here independently of fashion.machine: "x86_64" would not say which machine.
    models = (
        [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        if Path("/proc/cpuinfo").exists()
        else []
    )
    if models:
        assert card["training"]["device"] == "cpu" and card["training"]["device_name"] == models[0]

    tuned = tmp_path / "tuned"
    assert (
        main(parse_args([*args, "--init-from", str(base), "--freeze", "--no-plots", "--output-dir", str(tuned)])) == 0
    )
    before, _ = load_checkpoint(base)
    after, tuned_card = load_checkpoint(tuned)
    assert tuned_card["training"]["init_from"]["weights_sha256"] == card["weights"]["sha256"]
    linears_before = [m for m in before if isinstance(m, torch.nn.Linear)]
    linears_after = [m for m in after if isinstance(m, torch.nn.Linear)]
    assert torch.equal(linears_before[0].weight, linears_after[0].weight)  # frozen first layer
    assert not torch.equal(linears_before[-1].weight, linears_after[-1].weight)  # retrained last layer
    # Each card records the probe as its own weights score it, which the service checks before serving.
    assert card["probe"] == probe_record(before) and tuned_card["probe"] == probe_record(after)


def test_freeze_leaves_only_the_last_layer_trainable():
    model = build_model(ModelConfig())
    freeze_all_but_last(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["5.weight", "5.bias"]


def test_frozen_cnn_keeps_its_batchnorm_statistics(train_set, test_set):
    """Fine-tuning a CNN with --freeze retrains the last Linear only: BatchNorm's running mean and
    variance (buffers, not parameters) must stay as the base model had them."""
    model = build_model(ModelConfig(kind="cnn", channels=(4,), hidden_sizes=(8,)))
    freeze_all_but_last(model)
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    data = subset(train_set, 512)
    config = TrainConfig(arch="cnn", epochs=1, batch_size=128, bf16=False, threads=1, freeze=True, ema=0.0)
    train(model, data, test_set, config, torch.device("cpu"), log=lambda line: None)
    assert all(torch.equal(before[name], buffer) for name, buffer in model.named_buffers())
    config.freeze = False  # the same run unfrozen does move them, so the check above can fail
    train(model, data, test_set, config, torch.device("cpu"), log=lambda line: None)
    assert not torch.equal(before["1.running_mean"], dict(model.named_buffers())["1.running_mean"])


def test_extra_data_is_added_to_the_training_set(tmp_path, data_root, test_set):
    extra = make_folder(tmp_path / "extra", test_set)
    out = tmp_path / "out"
    assert main(parse_args(small_run(data_root, out, "--extra-data", str(extra), "--no-plots"))) == 0
    card = read_card(out)
    assert card["data"]["extra"]["images"] == 4
    assert "T-shirt_top/photo.jpg" in card["data"]["extra"]["files_sha256"]


# --------------------------------------------------------------------------- CLI errors (real processes)


@pytest.mark.cli
def test_missing_data_gives_one_clear_message_and_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(
        *("--data-dir", str(empty), "--debian-dir", str(tmp_path / "no-debian")),
        *("--no-download", "--output-dir", str(tmp_path / "out")),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--data-dir" in result.stderr and "dataset-fashion-mnist" in result.stderr and "download" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.cli
@pytest.mark.parametrize("download", [[], ["--no-download"]])
def test_a_data_dir_that_does_not_exist_is_refused_not_created(tmp_path, download):
    missing = tmp_path / "nonexistent"
    result = run_cli("--data-dir", str(missing), *download, "--output-dir", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"--data-dir {missing} does not exist" in result.stderr and "--download" in result.stderr
    assert "Traceback" not in result.stderr
    assert not missing.exists() and not (tmp_path / "out").exists()


@pytest.mark.cli
def test_output_dir_that_is_a_file_is_named_as_such(tmp_path, data_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("--data-dir", str(data_root), "--no-download", "--output-dir", str(blocker), timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"{blocker} is a file, not a folder" in result.stderr
    assert "Traceback" not in result.stderr and blocker.read_text() == "not a folder"


@pytest.mark.cli
def test_unwritable_output_dir_fails_before_training(tmp_path, data_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "models"
    result = run_cli("--data-dir", str(data_root), "--no-download", "--output-dir", str(out), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "cannot write the model to" in result.stderr and "is a file, not a folder" in result.stderr
    assert "training on" not in result.stderr  # refused before a single epoch ran
    assert "Traceback" not in result.stderr


@pytest.mark.cli
def test_init_from_takes_the_loaded_models_family_and_refuses_another(tmp_path, bundled_model_dir, data_root):
    result = run_cli(
        "--data-dir", str(data_root), "--no-download", "--arch", "cnn", "--init-from", str(bundled_model_dir),
        "--output-dir", str(tmp_path / "out"), timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "the model in" in result.stderr and "is a mlp" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.cli
def test_bad_extra_data_fails_before_training(tmp_path, data_root):
    bad = tmp_path / "extra" / "Coat"
    bad.mkdir(parents=True)
    (bad / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    result = run_cli(
        "--data-dir",
        str(data_root),
        "--extra-data",
        str(tmp_path / "extra"),
        "--no-download",
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert result.returncode == 2, result.stderr
    assert "scan.png" in result.stderr and "Traceback" not in result.stderr
    assert "epoch" not in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "0"],
        ["--batch-size", "x"],
        ["--lr", "-1"],
        ["--lr", "nan"],
        ["--weight-decay", "-1"],
        ["--device", "tpu"],
        ["--freeze"],
        ["--dropout", "1"],
        ["--erase", "1"],
        ["--mixup", "-0.2"],
        ["--ema", "-0.1"],
        ["--threads", "0"],
        ["--arch", "rnn"],
        ["--channels", "8"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


# --------------------------------------------------------------------------- crash safety

# Runs the real CLI with each os.fsync announced and then held until the test answers on stdin, so the
# signal always lands while the child waits at exactly that write, however loaded the machine is.
KILLABLE = textwrap.dedent(
    """
    import os, signal, sys
    # Python's own Ctrl-C handler, even when the suite was started from a background job of a
    # non-interactive shell, which starts its children with SIGINT ignored (the test would then hang).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real_fsync = os.fsync
    count = 0
    def held_fsync(fd):
        global count
        count += 1
        print(f"FSYNC {count}", flush=True)
        sys.stdin.readline()  # the test's go-ahead; a signal arrives while this waits
        real_fsync(fd)
    os.fsync = held_fsync
    from training.train import run
    sys.exit(run(sys.argv[1:]))
    """
)


@pytest.mark.cli
@pytest.mark.parametrize(
    ("kill_at", "sig"), [(1, signal.SIGKILL), (3, signal.SIGKILL), (4, signal.SIGKILL), (4, signal.SIGINT)]
)
def test_training_killed_mid_save_leaves_the_old_model(tmp_path, data_root, kill_at, sig):
    """fsync 1-2 are the plots' temporary files, 3 the weights', 4 the card's; 5 the folder after the renames."""
    out = tmp_path / "models"
    old_model = build_model(ModelConfig(hidden_sizes=(16,)))
    write_outputs(old_model, {"architecture": {"hidden_sizes": [16]}}, out, {CURVES_FILE: b"old curves"})
    old_files = {p.name: p.read_bytes() for p in out.iterdir()}

    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, *small_run(data_root, out)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stdout:
            if line.strip() == f"FSYNC {kill_at}":
                process.send_signal(sig)
                break
            if line.startswith("FSYNC"):
                process.stdin.write("go\n")
                process.stdin.flush()
        process.wait(timeout=60)
    finally:
        process.kill()
        stderr = process.stderr.read()
    assert process.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), stderr

    # The model (weights + card) is exactly the old one and still loads.
    assert (out / WEIGHTS_FILE).read_bytes() == old_files[WEIGHTS_FILE]
    assert (out / CARD_FILE).read_bytes() == old_files[CARD_FILE]
    load_checkpoint(out)
    # Under a final name there is only a complete file: the old one, or a whole new plot.
    for path in out.iterdir():
        if path.name == PREVIOUS_WEIGHTS_FILE:  # the kill landed after the old weights were kept aside
            assert path.read_bytes() == old_files[WEIGHTS_FILE]
        elif path.name.startswith("."):
            assert path.name.endswith((".tmp-write", ".tmp-link"))
            assert sig == signal.SIGKILL  # Ctrl-C cleans its temporary files up
        elif path.name == CONFUSION_FILE or (path.name == CURVES_FILE and path.read_bytes() != old_files[CURVES_FILE]):
            Image.open(path).verify()
        else:
            assert path.read_bytes() == old_files[path.name]


# Runs the real CLI and stops it for good between the commit's two renames (new weights, old card).
KILLED_BETWEEN_RENAMES = textwrap.dedent(
    """
    import os, sys, time
    real_replace = os.replace
    def replace_then_hang(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("model.safetensors"):
            print("WEIGHTS RENAMED", flush=True)
            time.sleep(60)
    os.replace = replace_then_hang
    from training.train import run
    sys.exit(run(sys.argv[1:]))
    """
)


@pytest.mark.cli
def test_training_killed_between_the_two_renames_still_serves_the_old_model(tmp_path, data_root):
    out = tmp_path / "models"
    old_model = build_model(ModelConfig(hidden_sizes=(16,))).eval()
    save_checkpoint(old_model, {"architecture": {"hidden_sizes": [16]}}, out)
    old_card = (out / CARD_FILE).read_bytes()
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_BETWEEN_RENAMES, *small_run(data_root, out, "--no-plots")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stdout:
            if line.strip() == "WEIGHTS RENAMED":
                process.kill()
                break
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGKILL

    assert (out / CARD_FILE).read_bytes() == old_card
    assert (out / WEIGHTS_FILE).read_bytes() != (out / PREVIOUS_WEIGHTS_FILE).read_bytes()  # new weights in place
    model, card = load_checkpoint(out)
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), old_model(x))
    assert card["weights"]["sha256"] == read_card(out)["weights"]["sha256"]


# --------------------------------------------------------------------------- the shipped model


def test_committed_default_model_reproduces_its_card(test_set):
    model, card = load_checkpoint(MODELS_DIR)
    accuracy, _, confusion = evaluate(model, test_set.inputs, test_set.targets)
    assert accuracy == card["metrics"]["test_accuracy"]
    assert confusion.tolist() == card["metrics"]["confusion_matrix"]["counts"]
    # The goal for the default MLP (issue 13); seeds 0/1/2 of the recipe gave 0.9134/0.9117/0.9141.
    assert accuracy >= 0.91
    assert card["training"]["device"] == "cpu"
    assert card["data"]["files_sha256"] == file_checksums(test_set.root)
    for name in (CURVES_FILE, CONFUSION_FILE):
        assert hashlib.sha256((MODELS_DIR / name).read_bytes()).hexdigest() == card["plots"][name]


def _idx_array(path: Path) -> np.ndarray:
    """An IDX file (the Fashion-MNIST format) read with numpy alone: magic, dimensions, then the bytes."""
    data = path.read_bytes()
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def test_shipped_model_accuracy_by_an_independent_evaluation(data_root):
    """The shipped weights scored without the project's loader, dataset, model or transform: numpy, float64.

    Only MEAN/STD and the class order come from the contract (they are checked against the data
    and torchvision in test_contract.py). A card that claimed more than the weights deliver fails here.
    """
    card = json.loads((MODELS_DIR / CARD_FILE).read_text())
    assert card["architecture"]["kind"] == "mlp", "this evaluator knows MLPs; the shipped model is one"
    weights = safetensors.numpy.load_file(str(MODELS_DIR / WEIGHTS_FILE))
    images = _idx_array(raw_folder(data_root) / "t10k-images-idx3-ubyte").astype(np.float64)
    labels = _idx_array(raw_folder(data_root) / "t10k-labels-idx1-ubyte")
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    x = (images.reshape(10_000, 784) / 255 - MEAN) / STD
    # The classifier's layers are numbered (nn.Sequential); "detector.*" is the not-a-garment scorer beside it.
    linears = sorted({int(name.split(".")[0]) for name in weights if not name.startswith("detector.")})
    for position, index in enumerate(linears):
        x = x @ weights[f"{index}.weight"].astype(np.float64).T + weights[f"{index}.bias"]
        if position < len(linears) - 1:
            x = np.maximum(x, 0)
    accuracy = float((x.argmax(axis=1) == labels).mean())
    # float64 here, float32 in the card: an image on a knife-edge may fall either way, no more than a few.
    assert abs(accuracy - card["metrics"]["test_accuracy"]) <= 0.0005
    # The goal for the default MLP (issue 13); seeds 0/1/2 of the recipe gave 0.9134/0.9117/0.9141.
    assert accuracy >= 0.91


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_few_training_steps_on_cuda(train_set, test_set, tmp_path):
    device = torch.device("cuda")
    data = subset(train_set, 4_096).to(device)
    test_on_gpu = TensorBatchDataset([test_set]).to(device)
    test_on_gpu.targets = test_set.targets
    model = build_model(ModelConfig())
    history = train(
        model,
        data,
        test_on_gpu,
        TrainConfig(epochs=2, batch_size=256, bf16=fast_bf16(device), shift_after=0),
        device,
        log=lambda _: None,
    )
    assert next(model.parameters()).device.type == "cuda"
    assert history[-1]["test_accuracy"] > 0.6
    write_outputs(model.cpu(), {"architecture": ModelConfig().to_dict()}, tmp_path, {})
    loaded, _ = load_checkpoint(tmp_path, "cuda")
    assert next(loaded.parameters()).device.type == "cuda"
    assert os.path.exists(tmp_path / WEIGHTS_FILE)


def test_cnn_trains_saves_and_loads_like_the_mlp(tmp_path, data_root, test_set):
    out = tmp_path / "cnn"
    argv = small_run(data_root, out, "--arch", "cnn", "--channels", "4,8", "--hidden-sizes", "16", "--no-plots")
    assert main(parse_args(argv)) == 0
    card = read_card(out)
    assert card["architecture"] == {"hidden_sizes": [16], "dropout": 0.25, "kind": "cnn", "channels": [4, 8]}
    model, _ = load_checkpoint(out)  # rebuilt from the card by build_model, nothing CNN-specific
    accuracy, _, _ = evaluate(model, test_set.inputs, test_set.targets)
    assert accuracy == card["metrics"]["test_accuracy"]
    assert validate_candidate(model, card, ValidationPolicy(min_accuracy=0.0))["agreement"] == 1.0


def test_the_one_bounded_number_parser():
    assert parse_bounded("1_000", int, minimum=1) == 1000
    assert parse_bounded(" 0.5 ", float, minimum=0, below=1) == 0.5
    for text, kind, bounds, message in [
        ("x", int, {}, "'x' is not an integer"),
        ("0", int, {"minimum": 1}, "must be at least 1, got 0"),
        ("9", int, {"minimum": 1, "maximum": 8}, "must be at least 1 and at most 8, got 9"),
        ("nan", float, {"above": 0}, "must be a finite number greater than 0, got nan"),
        ("inf", float, {}, "must be a finite number, got inf"),
        ("1", float, {"minimum": 0, "below": 1}, "must be a finite number at least 0 and below 1, got 1"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            parse_bounded(text, kind, **bounds)


def test_the_training_benchmark_times_the_recipe_it_is_given(data_root):
    """bench_training takes the training CLI's recipe options, checked as the CLI checks them, and times
    that recipe the same way (the 784-512-512-10 with --hidden-sizes 512,512 --weight-decay 0.05 --mixup 0)."""
    from benchmarks.bench_training import our_training, parse_args

    _, given = parse_args(["--hidden-sizes", "512,512", "--weight-decay", "0.05", "--mixup", "0", "--repeats", "1"])
    assert given == {"hidden_sizes": (512, 512), "weight_decay": 0.05, "mixup": 0.0}
    assert parse_args([])[1] == {}
    with pytest.raises(SystemExit):
        parse_args(["--mixup", "-0.2"])

    recipe = {"hidden_sizes": (16,), "weight_decay": 0.25, "mixup": 0.2, "epochs": 1}
    with threads_kept():
        run = our_training(data_root, torch.device("cpu"), seed=0, bf16=False, stop=False, recipe=recipe)
    assert run["trained"] == recipe
    assert 0.5 < run["accuracy"] < 1 and run["epoch_s"] > 0


def test_the_step_cost_benchmark_runs_the_recipes_steps(data_root, capsys):
    """bench_training --steps builds its steps from the training code; when that code's names or
    signatures change, this fails here instead of in a benchmark run."""
    from benchmarks.bench_training import TIMED_DROPOUT, step_costs

    step_costs(data_root, bf16=False, rounds=1)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8 and all(" ms (" in line for line in lines)
    assert any("BitsDropout" in line for line in lines) and any("nn.Dropout" in line for line in lines)
    assert TIMED_DROPOUT > 0 and any(f"BitsDropout({TIMED_DROPOUT}) ahead" in line for line in lines)
    assert any("by windows" in line for line in lines) and any("by gather" in line for line in lines)
