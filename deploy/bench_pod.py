"""Requests/s of one API pod under its Kubernetes limits, for deploy/README.md's capacity section.

Run a pod from the rendered Deployment with `podman kube play` (see deploy/README.md, "Try it without
a cluster"), then:

    python deploy/bench_pod.py --url http://POD_IP:8000 --container k8s-fashion-mnist-api-pod-0-api

It POSTs real test images as PNG to /predict with wrk (benchmarks/bench_serving.py's script and
bodies), repeats, and prints the median req/s and latencies, and the pod's CPU time per request from
podman (the container's cgroup), from which the req/s one pod sustains at its CPU limit follows
without counting the load generator, which shares this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.bench_serving import LUA_SCRIPT, png, write_bodies
from training.data import FastFashionMNIST, ensure_fashion_mnist

UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def cpu_seconds(container: str) -> float:
    """The container's CPU time so far (podman prints a Go duration such as 1m2.5s)."""
    out = subprocess.run(
        ["podman", "stats", "--no-stream", "--format", "json", container], capture_output=True, text=True, check=True
    ).stdout
    text = json.loads(out)[0]["cpu_time"]
    return sum(float(n) * UNITS[u] for n, u in re.findall(r"([\d.]+)(ns|us|µs|ms|s|m|h)", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the pod, e.g. http://10.89.0.2:8000")
    parser.add_argument("--container", required=True, help="podman's name of the pod's api container")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-limit", type=float, default=2.0, help="cores of the pod's CPU limit")
    args = parser.parse_args()

    root, _ = ensure_fashion_mnist(Path(os.environ.get("FASHION_DATA") or "data"), download=False)
    pixels = FastFashionMNIST(root, train=False).data.numpy()
    work = Path(tempfile.mkdtemp(prefix="bench-pod-"))
    (work / "post.lua").write_text(LUA_SCRIPT)
    bodies = write_bodies(work / "single", [png(pixels[i]) for i in range(200)])
    for i in range(50):  # warm-up
        requests.post(f"{args.url}/predict", data=png(pixels[i]), headers={"Content-Type": "image/png"}, timeout=10)

    runs = []
    env = {"BODY_DIR": str(bodies), "REQUEST_PATH": "/predict", "CONTENT_TYPE": "image/png", "PATH": "/usr/bin:/bin"}
    for _ in range(args.repeats):
        before = cpu_seconds(args.container)
        command = ["wrk", "-t2", f"-c{args.connections}", f"-d{args.duration}s", "--timeout", "10s"]
        out = subprocess.run(
            [*command, "-s", str(work / "post.lua"), f"{args.url}/predict"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        cpu = cpu_seconds(args.container) - before
        result = json.loads(out.strip().splitlines()[-1])
        result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
        result["cpu_us_per_request"] = cpu / max(1, result["requests"]) * 1e6
        runs.append(result)

    cpu_us = statistics.median(r["cpu_us_per_request"] for r in runs)
    summary = {
        "connections": args.connections,
        "rps_measured": round(statistics.median(r["rps"] for r in runs)),
        "p50_ms": statistics.median(r["p50_us"] for r in runs) / 1000,
        "p99_ms": statistics.median(r["p99_us"] for r in runs) / 1000,
        "failed": sum(sum(r["errors"].values()) for r in runs),
        "pod_cpu_us_per_request": round(cpu_us),
        "rps_at_cpu_limit": round(args.cpu_limit * 1e6 / cpu_us),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
