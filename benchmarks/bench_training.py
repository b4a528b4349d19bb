"""Training speed, measured side by side in one run: the PyTorch-quickstart loop vs ours.

1. Seconds per epoch of the quickstart-style loop (torchvision FashionMNIST with a per-item
   PIL -> ToTensor transform, DataLoader batch 64, SGD lr 1e-3, CrossEntropyLoss) vs the
   seconds per epoch of ``training.train.train`` with the CLI defaults (goal: ours >= 8x faster).
2. Wall time for the default training to first reach >= 0.90 test accuracy (goal: <= 15 s
   on 2 CPU cores), counted from the start of the loop (the precision/thread calibration
   included), with the one-off data preparation (transforming all 70,000 images) beside it.
3. With --forward: the batch-1 forward pass of each architecture's default model on one
   thread, as the service runs it (service.model.LoadedModel.predict: an MLP through DirectMLP, any
   other model layer by layer, softmax, inference mode; no detector): what serving one image costs.
4. With --steps (then exits): one training step of the default MLP recipe (forward, loss, backward,
   AdamW, EMA on one real batch) without dropout, with ``nn.Dropout`` and with ``BitsDropout`` at
   TIMED_DROPOUT (the default's rate, or 0.1 now that the default has none) (also
   as the step's core runs it when batches are prefetched: masks drawn and inputs cast beforehand),
   one dropout layer's forward and backward at the recipe's shapes, and the recipe's shift of a
   batch done both ways ``random_shift`` can do it: what the masks and the shift cost.

The runs alternate (quickstart epoch, our training, quickstart epoch, ...) so background load
hits both alike; medians are printed. Usage: python benchmarks/bench_training.py [--device cuda]
[--mode auto|fp32|bf16] [--forward]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

# As in training/__main__.py: sleeping OpenMP waiters, or a shared machine's load makes timings collapse.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from fashion.bounds import argparse_type
from fashion.contract import ModelConfig, build_model
from fashion.machine import cpu_name, cpuinfo_field
from training.data import FastFashionMNIST, TensorBatchDataset, ensure_fashion_mnist
from training.dropout import BitsDropout, dropout_widths, use_bits_dropout
from training.train import (
    RECIPES,
    TrainConfig,
    WeightAverage,
    add_recipe_arguments,
    fast_bf16,
    make_optimizer,
    optimizer_step,
    prepare_batch,
    random_shift,
    recipe_given,
    relu_in_place,
    resolve_device,
    shift_by_gather,
    shift_by_windows,
    threads_kept,
    train,
)

TARGET = 0.90
# --steps times dropout at the default MLP's rate, or, as it has none now, at the previous default's.
TIMED_DROPOUT = RECIPES["mlp"].dropout or 0.1
# The tutorial's NeuralNetwork (784-512-512-10) whatever our default's widths: the baseline stays put.
QUICKSTART_MODEL = ModelConfig(hidden_sizes=(512, 512))
MODES = {"auto": None, "fp32": False, "bf16": True}
# What oneDNN (bf16 products), MKL (float32 products) and ATen (the rest) may use; unset = all the CPU has.
KERNEL_ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def kernel_isa() -> str:
    """The instruction sets torch's kernels may use here: the CPU's, less what the caps take away.

    The same model name can train 7x apart (AMX or not), and the caps let one machine show what a
    CPU without AMX or AVX-512 gets (README, Benchmarks), so every figure says which ran it."""
    flags = set((cpuinfo_field("flags") or "").split())
    present = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    caps = [f"{name}={os.environ[name]}" for name in KERNEL_ISA_CAPS if os.environ.get(name)]
    return (
        f"CPU flags: {' '.join(present) or 'none of avx2/avx512f/avx512_bf16/amx_bf16'}; "
        f"ATen kernels: {torch.backends.cpu.get_cpu_capability()}; "
        + (f"capped by {' '.join(caps)}" if caps else "no cap")
    )


def quickstart_epoch(root: Path, device: torch.device, max_batches: int | None) -> tuple[float, float]:
    """(wall, CPU) seconds for one epoch of the tutorial's loop (extrapolated when ``max_batches`` cuts it short)."""
    data = datasets.FashionMNIST(root, train=True, download=False, transform=transforms.ToTensor())
    loader = DataLoader(data, batch_size=64)
    model = build_model(QUICKSTART_MODEL).to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    started, cpu_started = time.perf_counter(), time.process_time()
    batches = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    scale = len(loader) / batches
    return (time.perf_counter() - started) * scale, (time.process_time() - cpu_started) * scale


def our_training(
    root: Path, device: torch.device, seed: int, bf16: bool | None, stop: bool, recipe: dict | None = None
) -> dict:
    """One training run with the defaults (less ``recipe``'s changes): data preparation time, per-epoch
    seconds, time to TARGET, final accuracy."""
    started = time.perf_counter()
    train_set = FastFashionMNIST(root, train=True)
    test_set = FastFashionMNIST(root, train=False)
    train_data = TensorBatchDataset([train_set]).to(device)
    test_set.to(device)
    prepare = time.perf_counter() - started
    # Threads and (unless given) precision are chosen as the CLI does.
    config = TrainConfig(seed=seed, bf16=bf16, **(recipe or {}))
    torch.manual_seed(seed)
    model = build_model(config.model_config())
    cpu_started = time.process_time()
    stop_when = (lambda entry: entry["test_accuracy"] >= TARGET) if stop else None
    history = train(model, train_data, test_set, config, device, log=lambda _: None, stop_when=stop_when)
    cpu_per_epoch = (time.process_time() - cpu_started) / len(history)
    elapsed = [entry["elapsed_s"] for entry in history]
    epochs = [b - a for a, b in zip([0.0, *elapsed], elapsed, strict=False)]
    reached = next((e["elapsed_s"] for e in history if e["test_accuracy"] >= TARGET), None)
    return {
        "prepare_s": prepare,
        "epoch_s": statistics.median(epochs),
        "epoch_cpu_s": cpu_per_epoch,
        "to_target_s": reached,
        "total_s": elapsed[-1],
        "accuracy": history[-1]["test_accuracy"],
        "epoch_reached": next((e["epoch"] for e in history if e["test_accuracy"] >= TARGET), None),
        "mode": config.calibration["chosen"],
        "calibration_s": config.calibration.get("cost_s", 0.0),
        "best": max(e["test_accuracy"] for e in history),
        "trained": {
            "hidden_sizes": config.hidden_sizes,
            "weight_decay": config.weight_decay,
            "mixup": config.mixup,
            "epochs": len(history),
        },
    }


def forward_costs(repeats: int = 2_000) -> None:
    """Median microseconds of one image through each default architecture, one thread, as service/model.py runs it."""
    from service.model import LoadedModel

    with threads_kept(1):
        image = torch.randn(1, 1, 28, 28)
        for arch, recipe in RECIPES.items():
            model = build_model(recipe.model_config()).eval()
            weights = sum(p.numel() for p in model.parameters())
            served = LoadedModel(
                model=model, card={"weights": {"sha256": "0" * 64}}, device=torch.device("cpu"), signature=None
            )
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                served.predict(image)
                times.append(time.perf_counter() - started)
            print(
                f"batch-1 forward, 1 thread, {arch} {recipe.model_config().to_dict()}: "
                f"{statistics.median(times[100:]) * 1e6:.0f} us "
                f"(median of {repeats - 100}), {weights:,} weights ({weights * 4 / 1e6:.2f} MB float32)"
            )


def step_costs(root: Path, bf16: bool, rounds: int = 60) -> None:
    """Median milliseconds of a default MLP training step with each kind of dropout, of one dropout
    layer (forward + backward) at the recipe's batch and hidden width, and of the recipe's shift of a
    batch done each way; interleaved rounds."""
    recipe = RECIPES["mlp"]
    data = FastFashionMNIST(root, train=True)
    inputs, targets = data.inputs[: recipe.batch_size], data.target_vectors[: recipe.batch_size]

    def trainer(dropout: float, bits: bool, ahead: bool = False):
        """A step of the recipe, its ReLUs in place as ``train`` makes them; with ``ahead``, as the step's
        core runs it when batches are prefetched: the batch prepared beforehand by the loop's own
        ``prepare_batch`` (masks drawn, inputs cast), not timed."""
        model = relu_in_place(build_model(replace(recipe, dropout=dropout).model_config()).train())
        if bits:
            use_bits_dropout(model)
        optimizer, average = make_optimizer(model, recipe, torch.device("cpu")), WeightAverage(model, recipe.ema)
        layers, augmenting = dropout_widths(model) or [], torch.Generator().manual_seed(0)
        batch = [inputs, targets]

        def prepare() -> None:
            batch[0], batch[1] = prepare_batch(inputs, targets, recipe, augmenting, bf16, layers, prefetch=True)

        def step() -> None:
            optimizer_step(model, optimizer, batch[0], batch[1], recipe.label_smoothing, bf16)
            average.update()

        return step, prepare if ahead else None

    activations = torch.randn(
        recipe.batch_size, recipe.hidden_sizes[0], dtype=torch.bfloat16 if bf16 else torch.float32, requires_grad=True
    )

    def layer_pass(layer: nn.Module):
        def run() -> None:
            out = layer(activations)
            out.backward(torch.ones_like(out))

        return run, None

    # The recipe's shift of a batch, both ways random_shift can crop (the same images), as the training
    # loop meets it: a fresh random batch of the data, then random_shift itself.
    generator = torch.Generator().manual_seed(0)

    def shifted_batch(crop):
        def run() -> None:
            batch = data.inputs[torch.randint(0, len(data.inputs), (recipe.batch_size,), generator=generator)]
            random_shift(batch, recipe.shift, generator, crop)

        return run, None

    p = TIMED_DROPOUT
    step, layer, shifting = "forward, loss, backward, AdamW, EMA", "forward + backward", "index, pad and shift a batch"
    cases = {  # name -> (what one call does, (the call, what runs untimed before it or None))
        "step, no dropout": (step, trainer(0.0, False)),
        f"step, nn.Dropout({p})": (step, trainer(p, False)),
        f"step, BitsDropout({p})": (step, trainer(p, True)),
        f"step, BitsDropout({p}) ahead": (step, trainer(p, True, ahead=True)),
        f"one nn.Dropout({p}) layer": (layer, layer_pass(nn.Dropout(p).train())),
        f"one BitsDropout({p}) layer": (layer, layer_pass(BitsDropout(p).train())),
        f"batch + shift {recipe.shift} px by gather": (shifting, shifted_batch(shift_by_gather)),
        f"batch + shift {recipe.shift} px by windows": (shifting, shifted_batch(shift_by_windows)),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(rounds + 5):
        for name, (_, (run, prepare)) in cases.items():
            if prepare is not None:
                prepare()
            started = time.perf_counter()
            run()
            if round_ >= 5:  # the first calls pick kernels
                times[name].append(time.perf_counter() - started)
    shape = f"batch {recipe.batch_size}, {'bf16' if bf16 else 'float32'}, {torch.get_num_threads()} threads"
    for name, measured in times.items():
        what = cases[name][0]
        print(f"{name:>30}: {statistics.median(measured) * 1e3:6.2f} ms ({what}; {shape}; median of {rounds})")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """The benchmark's options, and the recipe changes to time (the training CLI's own recipe options)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=argparse_type(int, minimum=1), default=3)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--quickstart-batches", type=int, default=None, help="time only this many quickstart batches and extrapolate"
    )
    parser.add_argument("--mode", choices=tuple(MODES), default="auto", help="auto = timed at start, as the CLI")
    parser.add_argument("--forward", action="store_true", help="also time each architecture's batch-1 forward")
    parser.add_argument(
        "--steps", action="store_true", help="time a training step with each kind of dropout and the shift, then exit"
    )
    parser.add_argument(
        "--stop-at-target", action="store_true", help=f"end each run at >= {TARGET} (final accuracy not measured)"
    )
    # A recipe other than the MLP's default, timed the same way: e.g. --hidden-sizes 512,512 --weight-decay 0.05.
    add_recipe_arguments(parser.add_argument_group("our recipe, where not the MLP's default"))
    args = parser.parse_args(argv)
    return args, recipe_given(args)


def main(argv: list[str] | None = None) -> int:
    args, recipe = parse_args(argv)
    device = resolve_device(args.device)
    root, _ = ensure_fashion_mnist(args.data_dir)
    print(
        f"{cpu_name()}, {os.cpu_count()} CPUs; device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats, mode {args.mode}"
    )
    print(kernel_isa())
    print(f"our recipe: the defaults{''.join(f', {name} {value}' for name, value in recipe.items())}")
    if args.steps:
        bf16 = MODES[args.mode] if MODES[args.mode] is not None else fast_bf16(device)
        step_costs(root, bf16)
        return 0
    if args.forward:
        forward_costs()
    quick, quick_cpu, ours = [], [], []
    for repeat in range(args.repeats):
        wall, cpu = quickstart_epoch(root, device, args.quickstart_batches)
        quick.append(wall)
        quick_cpu.append(cpu)
        # train() leaves torch on the thread count it chose; the next repeat starts where a fresh process
        # would, so the quickstart loop runs on torch's default and our calibration may pick either.
        with threads_kept():
            ours.append(
                our_training(root, device, seed=repeat, bf16=MODES[args.mode], stop=args.stop_at_target, recipe=recipe)
            )
        run = ours[-1]
        reached = f"{run['to_target_s']:.1f}s" if run["to_target_s"] is not None else "never"
        print(
            f"  run {repeat + 1}: quickstart {quick[-1]:.2f} s/epoch ({quick_cpu[-1]:.2f} CPU s) | "
            f"ours {run['epoch_s']:.3f} s/epoch ({run['epoch_cpu_s']:.3f} CPU s), "
            f">= {TARGET} after {reached}, final {run['accuracy']:.4f} in {run['total_s']:.1f}s "
            f"(+{run['prepare_s']:.2f}s data prep); {run['mode']} chosen in {run['calibration_s']:.2f}s"
        )
    median = statistics.median
    ratios = [q / o["epoch_s"] for q, o in zip(quick, ours, strict=True)]
    reached = [o["to_target_s"] for o in ours if o["to_target_s"] is not None]
    print(f"quickstart loop: {median(quick):.2f} s/epoch (median)")
    print(f"our loop:        {median(o['epoch_s'] for o in ours):.3f} s/epoch (median, incl. per-epoch evaluation)")
    print(f"speed-up:        {median(ratios):.1f}x (median of paired ratios; goal >= 8x)")
    cpu_ratios = [q / o["epoch_cpu_s"] for q, o in zip(quick_cpu, ours, strict=True)]
    print(
        f"CPU time/epoch:  quickstart {median(quick_cpu):.2f} s, ours {median(o['epoch_cpu_s'] for o in ours):.3f} s, "
        f"{median(cpu_ratios):.1f}x less work (CPU seconds do not count other processes' load)"
    )
    print(f"machine load:    {os.getloadavg()[0]:.1f} (1-minute load average at the end; wall times suffer above ~2)")
    if reached:
        print(
            f"time to >= {TARGET}: {median(reached):.1f} s (median of {len(reached)}/{len(ours)} runs; goal <= 15 s; "
            f"epochs {[o['epoch_reached'] for o in ours]}) "
            f"+ {median(o['prepare_s'] for o in ours):.2f} s one-off data preparation"
        )
    else:
        print(f"time to >= {TARGET}: never reached")
    if not args.stop_at_target:
        print(f"final accuracy:  {median(o['accuracy'] for o in ours):.4f} (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
