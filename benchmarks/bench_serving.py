"""Serving benchmark: the real gunicorn server under wrk, next to a constant-JSON ceiling and a naive handler.

Starts the service (``service:create_app()``, its defaults: JSON access log and metrics on) and,
with the same gunicorn config and worker count, a Flask app answering a constant JSON
(benchmarks/ceiling_app.py): the most this gunicorn/Flask stack can do on this machine; and
the 20-line Flask handler anyone would write first (benchmarks/naive_app.py). The same two apps
run a second time on gunicorn's own defaults (``gunicorn -w 2 APP``, no config file: rows
``ceiling*`` and ``naive*``), as a user would start them. All are driven by wrk, interleaved,
with real Fashion-MNIST test images as PNG bodies, and the script prints:

- single-image requests/s and p50/p99 latency at 8 and 32 connections, the ratio to the
  ceiling and to the naive handler (on the service's config, and on gunicorn's defaults), each a
  median of per-round ratios from the same run;
- images/s for multipart batches of 64;
- start to first correct answer (gunicorn started -> a POST /predict answered right), median;
- memory of the whole server (master + workers) as PSS after the load.

Timings on a shared machine are noisy: runs are interleaved and repeated and medians printed.

    python benchmarks/bench_serving.py [--model-dir models] [--duration 8] [--repeats 3]
    python benchmarks/bench_serving.py --stages     # in-process CPU time per stage of /predict
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
from testing.models import TOY_MODEL_ENV, random_model_dir  # noqa: E402
from testing.server import ServerHandle, start_server  # noqa: E402

CEILING_APP = "benchmarks.ceiling_app:create_app()"
NAIVE_APP = "benchmarks.naive_app:create_app()"
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
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FASHION_DATA") or PROJECT_ROOT / "data"))
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
    parser.add_argument("--stages", action="store_true", help="print the in-process cost per stage and exit")
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the 'floor' row: the service serving a 784-32-10 MLP with random weights and no detector, "
        "i.e. everything a request costs but the shipped model's arithmetic",
    )
    parser.add_argument(
        "--no-plain",
        dest="plain",
        action="store_false",
        help="skip the ceiling* and naive* rows: the two apps on gunicorn's own defaults",
    )
    parser.add_argument(
        "--root",
        type=Path,
        help="with --stages: only the whole-request rows, for the service and ceiling code in this checkout "
        "(another commit's, e.g. `git worktree add /tmp/before 29f47c2`)",
    )
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
    wrk = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(args.duration / 2)
    split = handle.connections_per_worker()  # mid-run: how wrk's connections are spread over the workers
    output, errors = wrk.communicate()
    cpu_after = worker_cpu_seconds(handle)
    if wrk.returncode:
        raise subprocess.CalledProcessError(wrk.returncode, command, output, errors)
    result = json.loads(output.strip().splitlines()[-1])
    result["split"] = split
    # Only meaningful when no worker was recycled (max_requests) during the run.
    same_workers = cpu_before.keys() == cpu_after.keys()
    cpu = sum(cpu_after.values()) - sum(cpu_before.values())
    result["cpu_us_per_request"] = cpu / max(1, result["requests"]) * 1e6 if same_workers else float("nan")
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["failed"] = sum(result["errors"].values())
    return result


def bench_bodies(work: Path, pixels, batch_size: int) -> tuple[Path, Path]:
    """(folder of 200 single-image PNG bodies, folder of 8 multipart bodies of ``batch_size`` images),
    real test images, for LUA_SCRIPT."""
    singles = write_bodies(work / "single", [png(pixels[i]) for i in range(200)])
    batches = write_bodies(
        work / "batch",
        [multipart([png(pixels[(b * batch_size + k) % len(pixels)]) for k in range(batch_size)]) for b in range(8)],
    )
    return singles, batches


def warm_up(handle: ServerHandle, pixels, requests_: int = 50) -> None:
    """First requests (page faults, lazy imports) before timing; a server that answers wrong is not timed."""
    for i in range(requests_):
        answer = requests.post(
            handle.url + "/predict", data=png(pixels[i]), headers={"Content-Type": "image/png"}, timeout=10
        )
        answer.raise_for_status()


def medians(runs: list[dict]) -> dict:
    """One setting's wrk runs (run_wrk's results) -> their medians; CPU only from runs without a recycled worker."""
    cpu = [r["cpu_us_per_request"] for r in runs if r["cpu_us_per_request"] == r["cpu_us_per_request"]]
    return {
        "rps": statistics.median(r["rps"] for r in runs),
        "p50_ms": statistics.median(r["p50_us"] for r in runs) / 1000,
        "p99_ms": statistics.median(r["p99_us"] for r in runs) / 1000,
        "cpu_us_per_request": statistics.median(cpu) if cpu else float("nan"),
        "failed": sum(r["failed"] for r in runs),
        "rps_all": [round(r["rps"]) for r in runs],
        "splits": [r["split"] for r in runs],
        "most_uneven_split": "/".join(map(str, max((r["split"] for r in runs), key=unevenness))) or "-",
    }


def unevenness(split: list[int]) -> int:
    """How far apart the workers holding the most and the fewest connections were (0: even). Sync workers
    (``ceiling*``, ``naive*``) hold a connection only while they answer it, so theirs read 0/0 or 1/0."""
    return max(split) - min(split) if split else 0


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
    singles, batches = bench_bodies(work, pixels, args.batch_size)
    first_body, first_label = png(pixels[0]), CLASS_NAMES[int(labels[0])]

    results: dict = {"workers": args.workers, "duration_s": args.duration, "repeats": args.repeats}
    starts = [
        time_to_first_answer(args.model_dir, args.workers, first_body, first_label, work) for _ in range(args.starts)
    ]
    results["start_to_first_answer_s"] = {"median": statistics.median(starts), "all": starts}

    # Each server with its defaults; the service's are what a user gets (access log and metrics on).
    servers: dict[str, ServerHandle] = {}
    try:
        servers["ceiling"] = start_server(None, workers=args.workers, app=CEILING_APP, log_dir=work)
        servers["naive"] = start_server(args.model_dir, workers=args.workers, app=NAIVE_APP, log_dir=work)
        servers["service"] = service = start_server(args.model_dir, workers=args.workers, log_dir=work)
        if args.floor:
            tiny = random_model_dir(work / "floor-model", hidden_sizes=(32,))
            servers["floor"] = start_server(tiny, env=TOY_MODEL_ENV, workers=args.workers, log_dir=work)
        if args.plain:
            for name, app, model_dir in (("ceiling*", CEILING_APP, None), ("naive*", NAIVE_APP, args.model_dir)):
                servers[name] = start_server(
                    model_dir, workers=args.workers, app=app, log_dir=work, project_config=False
                )
        for handle in servers.values():
            warm_up(handle, pixels)
        single: dict = {}
        for connections in args.connections:
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            for _ in range(args.repeats):
                for name, handle in servers.items():
                    runs[name].append(run_wrk(handle, script, singles, "image/png", connections, args))
            single[connections] = {name: medians(rs) for name, rs in runs.items()}
            # Ratio per interleaved round, then the median: load from other processes hits all alike.
            for name, base in (
                ("ratio", "ceiling"),
                ("vs_naive", "naive"),
                ("ratio*", "ceiling*"),
                ("vs_naive*", "naive*"),
            ):
                if base in runs:
                    ratios = [s["rps"] / b["rps"] for s, b in zip(runs["service"], runs[base], strict=True)]
                    single[connections][name] = statistics.median(ratios)
            for name in ("naive", "floor", "ceiling*", "naive*"):
                if name in runs:
                    ratios = [n["rps"] / c["rps"] for n, c in zip(runs[name], runs["ceiling"], strict=True)]
                    single[connections][f"{name}_ratio"] = statistics.median(ratios)
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
        results["pss_mb"] = {name: pss_mb(handle) for name, handle in servers.items()}
        served = service.access_entries()
        results["server_errors_logged"] = sum(1 for e in served if e["status"] >= 500)
    finally:
        for handle in servers.values():
            handle.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def report(results: dict) -> None:
    print(f"\nserving benchmark: {results['workers']} workers, wrk {results['duration_s']} s x {results['repeats']}")
    print("(ceiling* and naive*: the same apps on gunicorn's own defaults, without the project's config)")
    print(
        f"{'connections':>11} | {'server':>8} | {'req/s':>7} | {'vs ceiling':>10} | {'p50 ms':>6} | {'p99 ms':>6} | "
        "worker CPU us/req | failed | connections per worker (most uneven run)"
    )
    for connections, row in results["single"].items():
        ratios = {"ceiling": 1.0, "service": row["ratio"]}
        for name in ("naive", "floor", "ceiling*", "naive*"):
            ratios[name] = row.get(f"{name}_ratio")
        for name in [name for name in ("ceiling", "naive", "service", "floor", "ceiling*", "naive*") if name in row]:
            r = row[name]
            print(
                f"{connections:>11} | {name:>8} | {r['rps']:>7,.0f} | {ratios[name]:>10.2f} | {r['p50_ms']:>6.2f} | "
                f"{r['p99_ms']:>6.2f} | {r['cpu_us_per_request']:>17.0f} | {r['failed']:>6} | {r['most_uneven_split']}"
            )
        print(f"{'':>11} | service / naive: {row['vs_naive']:.2f}x")
        if "ratio*" in row:
            print(
                f"{'':>11} | on gunicorn's defaults: service / ceiling* {row['ratio*']:.2f}, "
                f"service / naive* {row['vs_naive*']:.2f}x"
            )
    b = results["batch"]
    print(
        f"batches of {b['batch_size']} at {b['connections']} connections: {b['images_per_s']:,.0f} images/s "
        f"(p50 {b['p50_ms']:.1f} ms, p99 {b['p99_ms']:.1f} ms, failed {b['failed']})"
    )
    start = results["start_to_first_answer_s"]
    runs = ", ".join(f"{s:.2f}" for s in start["all"])
    print(f"start to first correct answer: {start['median']:.2f} s (median of {runs})")
    print("memory (PSS, master + workers): " + ", ".join(f"{k} {v:.0f} MB" for k, v in results["pss_mb"].items()))
    print(f"5xx answers logged by the service: {results['server_errors_logged']}")


# --------------------------------------------------------------------------- stages


def stage_costs(
    args: argparse.Namespace, images: int = 500, rounds: int = 7
) -> tuple[dict[str, float], dict[str, float] | None]:
    """In-process CPU microseconds per call of each stage of a single-image POST /predict (median of
    rounds; the whole request through the WSGI app, no HTTP server), next to the ceiling app's request;
    and for this checkout the same steps timed inside whole requests (``steps_inside_requests``)."""
    import io as _io
    import sys as _sys

    from werkzeug.test import EnvironBuilder

    pixels = FashionMNIST(str(args.data_dir), train=False).data.numpy()
    blobs = [png(pixels[i]) for i in range(images)]
    if args.root:  # another checkout's code, all of it: drop what this one has imported
        for name in [m for m in _sys.modules if m.split(".")[0] in ("fashion", "service", "benchmarks")]:
            del _sys.modules[name]
        _sys.path.insert(0, str(args.root.resolve()))
    from benchmarks import ceiling_app
    from service import create_app

    app = create_app({"MODEL_DIR": str(args.model_dir)})  # the defaults: access log and metrics on
    ceiling = ceiling_app.create_app()
    environs = [
        EnvironBuilder(path="/predict", method="POST", data=b, content_type="image/png").get_environ() for b in blobs
    ]

    def through(wsgi_app):
        def run(index: int) -> None:
            environ = dict(environs[index], **{"wsgi.input": _io.BytesIO(blobs[index])})
            for _ in wsgi_app(environ, lambda *_: None):
                pass

        return run

    stages = {
        "ceiling: a constant-JSON Flask request": through(ceiling),
        "/predict: the whole request": through(app),
    }
    if not args.root:
        # What a request the fast path leaves to Flask takes: the same crop through the route.
        stages["/predict through Flask's route (no fast path)"] = through(app.wsgi_app.flask)
        stages.update(_stages_of_this_checkout(app, blobs, environs))
    costs: dict[str, list[float]] = {name: [] for name in stages}
    null = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(2)
    os.dup2(null, 2)  # the access lines of the whole-request rows
    try:
        for _ in range(rounds):  # interleaved, so load from other processes hits every stage alike
            for name, stage in stages.items():
                started = time.process_time()
                for index in range(images):
                    stage(index)
                costs[name].append((time.process_time() - started) / images * 1e6)
        inside = None
        if not args.root:
            inside = steps_inside_requests(app, blobs, environs, rounds)
            inside.update(cold_step_costs([pixels[index].tobytes() for index in range(images)]))
    finally:
        os.dup2(saved, 2)
        os.close(null)
    return {name: statistics.median(values) for name, values in costs.items()}, inside


def _steps_of_a_request(app) -> dict[str, tuple[object, str]]:
    """The steps of a fast-path ``/predict`` through ``app``, each as (owner, attribute): the module
    global, class method or bound method the request calls at run time, so that replacing it times the
    calls requests make."""
    import service.fast_path
    import service.model
    import service.web
    from fashion.trust import Judge

    return {
        "plain_crop_inputs (decode + pixels + normalized tensor)": (service.fast_path, "plain_crop_inputs"),
        "  decode_crop": (service.web, "decode_crop"),
        "  pixel_rows_to_input": (service.web, "pixel_rows_to_input"),
        "runner.predict (forward + softmax + judge + metrics)": (service.model.ModelRunner, "predict"),
        "  model forward + softmax + judge": (service.model.LoadedModel, "predict"),
        "    the MLP's forward (DirectMLP)": (service.model.DirectMLP, "__call__"),
        "    judge (calibration + not-a-garment detector)": (Judge, "judge"),
        "predictions_json (the answer's JSON text)": (service.fast_path, "predictions_json"),
        # FastPath keeps the recorder's bound method.
        "RequestRecorder.record (metrics + access line)": (app.wsgi_app, "record"),
    }


def steps_inside_requests(app, blobs: list[bytes], environs: list[dict], rounds: int = 7) -> dict[str, float]:
    """Microseconds per request spent in each step of a fast-path ``/predict``, timed inside whole
    requests through ``app`` (wall time, one thread; the median of ``rounds`` passes over the images),
    and the whole request itself under the key ``"whole request"``.

    The stage rows time each step alone, in a tight loop, where its code and data stay in the caches;
    inside a request every other step runs in between. Raises if a step was not called once per request:
    then the fast path no longer calls what is timed here, and the figures would be silently zero.
    """
    import functools
    import io as _io

    steps = _steps_of_a_request(app)
    spent = dict.fromkeys(steps, 0.0)
    calls = dict.fromkeys(steps, 0)

    def timed(name: str, function):
        @functools.wraps(function)
        def step(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started
                calls[name] += 1

        return step

    originals = {name: vars(owner)[attribute] for name, (owner, attribute) in steps.items()}
    per_round: dict[str, list[float]] = {name: [] for name in [*steps, "whole request"]}
    try:
        for name, (owner, attribute) in steps.items():
            setattr(owner, attribute, timed(name, originals[name]))
        for _ in range(rounds):
            for name in steps:
                spent[name], calls[name] = 0.0, 0
            started = time.perf_counter()
            for index, blob in enumerate(blobs):
                environ = dict(environs[index], **{"wsgi.input": _io.BytesIO(blob)})
                for _ in app(environ, lambda *_: None):
                    pass
            per_round["whole request"].append((time.perf_counter() - started) / len(blobs) * 1e6)
            missed = [name.strip() for name, count in calls.items() if count < len(blobs)]
            if missed:
                raise RuntimeError(f"not called once per request, so not timed: {', '.join(missed)}")
            for name in steps:
                per_round[name].append(spent[name] / len(blobs) * 1e6)
    finally:
        for name, (owner, attribute) in steps.items():
            setattr(owner, attribute, originals[name])
    return {name: statistics.median(values) for name, values in per_round.items()}


def cold_step_costs(rows: list[bytes], calls: int = 3000) -> dict[str, float]:
    """Median wall microseconds of one small step (``pixel_rows_to_input`` of a crop's 784 bytes) right
    after each thing a served request may have done before it: nothing (a tight loop), reading 8 MB of
    other memory, sleeping 0.2 ms (a worker waiting for its next request). How much of a step's cost is
    the machine fetching its code and data back, which the tight-loop rows leave out."""
    import numpy as np

    from fashion.contract import pixel_rows_to_input

    other_memory = np.ones(2**20)  # 8 MB
    before = {
        "a tight loop": lambda: None,
        "after reading 8 MB of other memory": other_memory.sum,
        "after sleeping 0.2 ms": lambda: time.sleep(0.0002),
    }
    costs = {}
    for name, then in before.items():
        times = []
        for index in range(calls):
            then()
            started = time.perf_counter()
            pixel_rows_to_input([rows[index % len(rows)]])
            times.append(time.perf_counter() - started)
        costs[f"pixel_rows_to_input, {name}"] = statistics.median(times) * 1e6
    return costs


def _judged(judge, inputs, logits, index: int) -> None:
    import torch

    with torch.inference_mode():
        judge.judge(inputs[index : index + 1], logits[index : index + 1])


def _stages_of_this_checkout(app, blobs: list[bytes], environs: list[dict]) -> dict:
    """The steps of a /predict, each callable with an image's index."""
    import io as _io

    import torch

    from fashion.contract import pixel_rows_to_input, to_fashion_mnist
    from fashion.images import decode_image
    from service.web import crop_pixels, decode_crop, prediction_json, read_images, to_inputs, verdict_json

    runner = app.extensions["model_runner"]
    model = runner.current
    decoded = [decode_image(blob) for blob in blobs]
    batches = [to_inputs([blob], "auto", 10**8) for blob in blobs]
    judge, inputs = model.judge, torch.cat(batches)
    verdicts = model.predict(inputs)
    rows = [row.tolist() for row in verdicts.probabilities]
    trust = list(map(verdict_json, verdicts.calibrated, verdicts.reasons))
    with torch.inference_mode():
        logits = model.model(inputs)
    crop_bytes = [crop_pixels(image, "auto") for image in decoded]

    def forward(batch) -> None:
        with torch.inference_mode():
            model.direct(batch)

    def reading(index: int) -> None:
        environ = dict(environs[index], **{"wsgi.input": _io.BytesIO(blobs[index])})
        with app.request_context(environ):
            read_images(64)

    stages = {
        "read_images (the body, in a request context)": reading,
        "decode_crop (the plain 28x28 PNG decoder)": lambda i: decode_crop(blobs[i]),
        "decode_image (the general path: Pillow open + load)": lambda i: decode_image(blobs[i]),
        "crop_pixels (a decoded crop's pixels, inverted if asked)": lambda i: crop_pixels(decoded[i], "auto"),
        "to_fashion_mnist (the general photo path)": lambda i: to_fashion_mnist(decoded[i], "auto"),
        "to_inputs (decode + pixels + normalized tensor)": lambda i: to_inputs([blobs[i]], "auto", 10**8),
        "pixel_rows_to_input (a crop's 784 bytes to the normalized tensor)": lambda i: pixel_rows_to_input(
            [crop_bytes[i]]
        ),
        "the MLP's forward alone (DirectMLP)": lambda i: forward(batches[i]),
        "model forward + softmax + judge": lambda i: model.predict(batches[i]),
        "judge alone (calibration + not-a-garment detector)": lambda i: _judged(judge, inputs, logits, i),
        "runner.predict (forward + softmax + judge + metrics)": lambda i: runner.predict(model, batches[i]),
        "prediction_json (the answer's JSON text)": lambda i: prediction_json(
            rows[i], 0, model.identity_json, trust[i]
        ),
    }
    return stages


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.stages:
        costs, inside = stage_costs(arguments)
        print(f"in-process CPU time per call, us (median of 7 interleaved rounds, 1 thread), {sys.modules['service']}:")
        for stage, microseconds in costs.items():
            print(f"{microseconds:8.1f}  {stage}")
        if inside is not None:
            print(
                "the fast path's steps timed inside whole requests, wall us per request (median of 7 rounds);"
                " then one small step after what a request may do before it (median of 3000 calls):"
            )
            for step, microseconds in inside.items():
                print(f"{microseconds:8.1f}  {step}")
    else:
        main(arguments)
