"""Training speed, measured side by side in one run: the PyTorch-quickstart loop vs ours.

1. Seconds per epoch of the quickstart-style loop (torchvision FashionMNIST with a per-item
   PIL -> ToTensor transform, DataLoader batch 64, SGD lr 1e-3, CrossEntropyLoss) vs the
   seconds per epoch of ``training.train.train`` with the CLI defaults (goal: ours >= 8x faster).
2. Wall time for the default training to first reach >= 0.90 test accuracy (goal: <= 25 s
   on 2 CPU cores), counted from the start of the loop, with the one-off data preparation
   (transforming all 70,000 images) reported beside it.

The runs alternate (quickstart epoch, our training, quickstart epoch, ...) so background load
hits both alike; medians are printed. Usage: python benchmarks/bench_training.py [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# As in training/__main__.py: sleeping OpenMP waiters, or a shared machine's load makes timings collapse.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from fashion.contract import ModelConfig, build_model
from training.data import FastFashionMNIST, TensorBatchDataset, ensure_fashion_mnist
from training.train import TrainConfig, fast_bf16, resolve_device, train

TARGET = 0.90


def quickstart_epoch(root: Path, device: torch.device, max_batches: int | None) -> tuple[float, float]:
    """(wall, CPU) seconds for one epoch of the tutorial's loop (extrapolated when ``max_batches`` cuts it short)."""
    data = datasets.FashionMNIST(root, train=True, download=False, transform=transforms.ToTensor())
    loader = DataLoader(data, batch_size=64)
    model = build_model(ModelConfig()).to(device)
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


def our_training(root: Path, device: torch.device, seed: int) -> dict:
    """One default training run: data preparation time, per-epoch seconds, time to TARGET, final accuracy."""
    started = time.perf_counter()
    train_set = FastFashionMNIST(root, train=True)
    test_set = FastFashionMNIST(root, train=False)
    train_data = TensorBatchDataset([train_set]).to(device)
    test_set.to(device)
    prepare = time.perf_counter() - started
    config = TrainConfig(seed=seed)
    config.bf16 = config.bf16 and fast_bf16(device)  # as the CLI does
    torch.manual_seed(seed)
    model = build_model(ModelConfig(hidden_sizes=config.hidden_sizes, dropout=config.dropout))
    cpu_started = time.process_time()
    history = train(model, train_data, test_set, config, device, log=lambda _: None)
    cpu_per_epoch = (time.process_time() - cpu_started) / config.epochs
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
        "best": max(e["test_accuracy"] for e in history),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--quickstart-batches", type=int, default=None, help="time only this many quickstart batches and extrapolate"
    )
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    root, _ = ensure_fashion_mnist(args.data_dir)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    quick, quick_cpu, ours = [], [], []
    for repeat in range(args.repeats):
        wall, cpu = quickstart_epoch(root, device, args.quickstart_batches)
        quick.append(wall)
        quick_cpu.append(cpu)
        ours.append(our_training(root, device, seed=repeat))
        run = ours[-1]
        reached = f"{run['to_target_s']:.1f}s" if run["to_target_s"] is not None else "never"
        print(
            f"  run {repeat + 1}: quickstart {quick[-1]:.2f} s/epoch ({quick_cpu[-1]:.2f} CPU s) | "
            f"ours {run['epoch_s']:.3f} s/epoch ({run['epoch_cpu_s']:.3f} CPU s), "
            f">= {TARGET} after {reached}, final {run['accuracy']:.4f} in {run['total_s']:.1f}s "
            f"(+{run['prepare_s']:.2f}s data prep)"
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
            f"time to >= {TARGET}: {median(reached):.1f} s (median of {len(reached)}/{len(ours)} runs; goal <= 25 s) "
            f"+ {median(o['prepare_s'] for o in ours):.2f} s one-off data preparation"
        )
    else:
        print(f"time to >= {TARGET}: never reached")
    print(f"final accuracy:  {median(o['accuracy'] for o in ours):.4f} (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
