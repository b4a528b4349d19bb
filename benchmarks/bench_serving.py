"""Serving benchmark: the real gunicorn server under wrk, next to a constant-JSON ceiling.

Starts the service (``service:create_app()``) and, with the same gunicorn config and worker
count, a Flask app answering a constant JSON (benchmarks/ceiling_app.py): the most this
gunicorn/Flask stack can do on this machine. Both are driven by wrk, interleaved, with real
Fashion-MNIST test images as PNG bodies, and the script prints:

- single-image requests/s and p50/p99 latency at 8 and 32 connections, and the ratio to the
  ceiling measured in the same run;
- images/s for multipart batches of 64;
- start to first correct answer (gunicorn started -> a POST /predict answered right), median;
- memory of the whole server (master + workers) as PSS after the load.

Timings on a shared machine are noisy: runs are interleaved and repeated and medians printed.

    python benchmarks/bench_serving.py [--model-dir models] [--duration 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

import requests  # noqa: E402
from torchvision.datasets import FashionMNIST  # noqa: E402

from fashion.contract import CLASS_NAMES  # noqa: E402
from testing.images import png  # noqa: E402
from testing.server import ServerHandle, start_server  # noqa: E402

CEILING_APP = "benchmarks.ceiling_app:create_app()"
BOUNDARY = "fashionbenchboundary"

# The one wrk script of both benchmarks (bench_v2.py too); run_wrk sets its environment.
LUA_SCRIPT = r"""
-- POSTs the request bodies in BODY_DIR (0.bin, 1.bin, ...) to REQUEST_PATH in turn, each with
-- Content-Type CONTENT_TYPE (when set) and the headers in N.headers ("Name: value" lines) if present.
local dir, path, ctype = os.getenv("BODY_DIR"), os.getenv("REQUEST_PATH"), os.getenv("CONTENT_TYPE")
local requests_, n, i = {}, 0, 0
function init(args)
  while true do
    local f = io.open(dir .. "/" .. n .. ".bin", "rb")
    if not f then break end
    local body = f:read("*a"); f:close()
    local headers = {}
    if ctype then headers["Content-Type"] = ctype end
    local h = io.open(dir .. "/" .. n .. ".headers", "r")
    if h then
      for line in h:lines() do
        local k, v = line:match("^([^:]+):%s*(.*)$")
        if k then headers[k] = v end
      end
      h:close()
    end
    n = n + 1
    requests_[n] = wrk.format("POST", path, headers, body)
  end
end
function request()
  i = i % n + 1
  return requests_[i]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "mean_us": %.1f, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def wrk_parser(description: str, duration: int, connections: list[int]) -> argparse.ArgumentParser:
    """The options of both benchmarks: model and data, server workers, wrk runs, JSON output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", type=Path, default=PROJECT_ROOT / "models")
    parser.add_argument("--data-dir", type=Path, default=PROJECT_ROOT / "data")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=int, default=duration, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per setting (median reported)")
    parser.add_argument("--connections", type=int, nargs="+", default=connections)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = wrk_parser(__doc__.split("\n\n")[0], duration=8, connections=[8, 32])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batch-connections", type=int, default=4)
    parser.add_argument("--starts", type=int, default=3, help="cold starts timed")
    return parser.parse_args(argv)


def write_bodies(directory: Path, bodies: list[bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, body in enumerate(bodies):
        (directory / f"{i}.bin").write_bytes(body)
    return directory


def multipart(images: list[bytes]) -> bytes:
    parts = []
    for i, image in enumerate(images):
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{i}.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + image
            + b"\r\n"
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def worker_cpu_seconds(handle: ServerHandle) -> dict[int, float]:
    """User + system CPU seconds each worker (master excluded) has used so far."""
    seconds = {}
    for pid in handle.worker_pids():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        seconds[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def run_wrk(
    handle: ServerHandle,
    script: Path,
    body_dir: Path,
    content_type: str | None,
    connections: int,
    args,
    path: str = "/predict",
) -> dict:
    """One wrk run of LUA_SCRIPT POSTing body_dir's bodies to ``path`` (with ``content_type``, or
    each body's own headers); adds req/s, failures and the workers' CPU time per request (less
    sensitive to other load)."""
    env = {"BODY_DIR": str(body_dir), "REQUEST_PATH": path, "PATH": "/usr/bin:/bin"}
    if content_type is not None:
        env["CONTENT_TYPE"] = content_type
    command = [
        "wrk",
        f"-t{min(args.wrk_threads, connections)}",
        f"-c{connections}",
        f"-d{args.duration}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        handle.url + path,
    ]
    cpu_before = worker_cpu_seconds(handle)
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    cpu_after = worker_cpu_seconds(handle)
    result = json.loads(output.strip().splitlines()[-1])
    # Only meaningful when no worker was recycled (max_requests) during the run.
    same_workers = cpu_before.keys() == cpu_after.keys()
    cpu = sum(cpu_after.values()) - sum(cpu_before.values())
    result["cpu_us_per_request"] = cpu / max(1, result["requests"]) * 1e6 if same_workers else float("nan")
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["failed"] = sum(result["errors"].values())
    return result


def pss_mb(handle: ServerHandle) -> float:
    """Proportional set size of the master and its workers: shared pages counted once in total."""
    total_kb = 0
    for pid in [handle.pid, *handle.worker_pids()]:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def time_to_first_answer(model_dir: Path, workers: int, body: bytes, label: str, log_dir: Path) -> float:
    """Seconds from starting gunicorn to the first POST /predict answered with ``label``."""
    handle = start_server(model_dir, workers=workers, wait=None, log_dir=log_dir)
    try:
        session = requests.Session()
        while handle.alive():
            try:
                response = session.post(
                    handle.url + "/predict", data=body, headers={"Content-Type": "image/png"}, timeout=5
                )
                if response.status_code == 200 and response.json()["label"] == label:
                    return time.monotonic() - handle.started_at
            except requests.ConnectionError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"the server exited during start-up:\n{handle.log_text()[-2000:]}")
    finally:
        handle.stop()


def main(args: argparse.Namespace) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if not (args.model_dir / "model.json").is_file():
        raise SystemExit(f"no model in {args.model_dir}: run `make train` first")
    test_set = FashionMNIST(str(args.data_dir), train=False)
    pixels, labels = test_set.data.numpy(), test_set.targets.numpy()
    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    script = work / "post.lua"
    script.write_text(LUA_SCRIPT)
    singles = write_bodies(work / "single", [png(pixels[i]) for i in range(200)])
    batches = write_bodies(
        work / "batch",
        [
            multipart([png(pixels[(b * args.batch_size + k) % 10_000]) for k in range(args.batch_size)])
            for b in range(8)
        ],
    )
    first_body, first_label = png(pixels[0]), CLASS_NAMES[int(labels[0])]

    results: dict = {"workers": args.workers, "duration_s": args.duration, "repeats": args.repeats}
    starts = [
        time_to_first_answer(args.model_dir, args.workers, first_body, first_label, work) for _ in range(args.starts)
    ]
    results["start_to_first_answer_s"] = {"median": statistics.median(starts), "all": starts}

    service = start_server(args.model_dir, workers=args.workers, env={"RELOAD_INTERVAL": "2"}, log_dir=work)
    ceiling = start_server(None, workers=args.workers, app=CEILING_APP, log_dir=work)
    try:
        for handle in (service, ceiling):  # warm both: first requests, page faults
            for i in range(50):
                requests.post(
                    handle.url + "/predict", data=png(pixels[i]), headers={"Content-Type": "image/png"}, timeout=10
                )
        single: dict = {}
        for connections in args.connections:
            runs: dict[str, list[dict]] = {"ceiling": [], "service": []}
            for _ in range(args.repeats):
                for name, handle in (("ceiling", ceiling), ("service", service)):
                    runs[name].append(run_wrk(handle, script, singles, "image/png", connections, args))
            single[connections] = {
                name: {
                    "rps": statistics.median(r["rps"] for r in rs),
                    "p50_ms": statistics.median(r["p50_us"] for r in rs) / 1000,
                    "p99_ms": statistics.median(r["p99_us"] for r in rs) / 1000,
                    "cpu_us_per_request": statistics.median(
                        [r["cpu_us_per_request"] for r in rs if r["cpu_us_per_request"] == r["cpu_us_per_request"]]
                        or [float("nan")]
                    ),
                    "failed": sum(r["failed"] for r in rs),
                    "rps_all": [round(r["rps"]) for r in rs],
                }
                for name, rs in runs.items()
            }
            # Ratio per interleaved pair, then the median: load from other processes hits both alike.
            ratios = [s["rps"] / c["rps"] for s, c in zip(runs["service"], runs["ceiling"], strict=True)]
            single[connections]["ratio"] = statistics.median(ratios)
        results["single"] = single

        batch_runs = [
            run_wrk(service, script, batches, f"multipart/form-data; boundary={BOUNDARY}", args.batch_connections, args)
            for _ in range(args.repeats)
        ]
        results["batch"] = {
            "batch_size": args.batch_size,
            "connections": args.batch_connections,
            "images_per_s": statistics.median(r["rps"] for r in batch_runs) * args.batch_size,
            "p50_ms": statistics.median(r["p50_us"] for r in batch_runs) / 1000,
            "p99_ms": statistics.median(r["p99_us"] for r in batch_runs) / 1000,
            "failed": sum(r["failed"] for r in batch_runs),
        }
        results["pss_mb"] = {"service": pss_mb(service), "ceiling": pss_mb(ceiling)}
        served = service.access_entries()
        results["server_errors_logged"] = sum(1 for e in served if e["status"] >= 500)
    finally:
        service.stop()
        ceiling.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def report(results: dict) -> None:
    print(f"\nserving benchmark: {results['workers']} workers, wrk {results['duration_s']} s x {results['repeats']}")
    print(
        f"{'connections':>11} | {'ceiling req/s':>13} | {'service req/s':>13} | {'ratio':>5} | "
        f"{'p50 ms':>6} | {'p99 ms':>6} | {'ceiling p99':>11} | worker CPU us/req (ceiling/service) | failed"
    )
    for connections, row in results["single"].items():
        s, c = row["service"], row["ceiling"]
        print(
            f"{connections:>11} | {c['rps']:>13,.0f} | {s['rps']:>13,.0f} | {row['ratio']:>5.2f} | "
            f"{s['p50_ms']:>6.2f} | {s['p99_ms']:>6.2f} | {c['p99_ms']:>11.2f} | "
            f"{c['cpu_us_per_request']:>6.0f} / {s['cpu_us_per_request']:<6.0f} | {s['failed'] + c['failed']}"
        )
    b = results["batch"]
    print(
        f"batches of {b['batch_size']} at {b['connections']} connections: {b['images_per_s']:,.0f} images/s "
        f"(p50 {b['p50_ms']:.1f} ms, p99 {b['p99_ms']:.1f} ms, failed {b['failed']})"
    )
    start = results["start_to_first_answer_s"]
    runs = ", ".join(f"{s:.2f}" for s in start["all"])
    print(f"start to first correct answer: {start['median']:.2f} s (median of {runs})")
    print(
        f"memory (PSS, master + workers): service {results['pss_mb']['service']:.0f} MB, "
        f"ceiling {results['pss_mb']['ceiling']:.0f} MB"
    )
    print(f"5xx answers logged by the service: {results['server_errors_logged']}")


if __name__ == "__main__":
    main(parse_args())
