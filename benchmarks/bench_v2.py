"""Interop benchmark: the Open Inference Protocol v2 endpoint next to POST /predict, in one run.

Starts the service and the constant-JSON ceiling app (benchmarks/ceiling_app.py) with the same
gunicorn config and worker count, and drives them with wrk, interleaved, on real Fashion-MNIST
test images. For single-image requests it reports requests/s, p50 and p99 of:

- ``ceiling``: the constant-JSON endpoint (the most this gunicorn/Flask stack does here);
- ``predict``: ``POST /predict`` with a PNG body;
- ``v2-json``: ``POST /v2/models/fashion-mnist/infer`` with the FP32 input as JSON numbers;
- ``v2-binary``: the same with binary tensor data in and out (Inference-Header-Content-Length);
- ``v2-image``: the PNG file itself in the BYTES ``image`` input (binary), decoded like /predict.

It also measures what the Prometheus hooks cost per request, in-process and in multi-process
mode (the mode gunicorn runs them in), against the time a request takes at the measured rate.

    python benchmarks/bench_v2.py [--model-dir models] [--duration 5] [--repeats 3]
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

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from torchvision.datasets import FashionMNIST  # noqa: E402

from benchmarks.bench_serving import (  # noqa: E402
    CEILING_APP,
    LUA_SCRIPT,
    pss_mb,
    run_wrk,
    write_bodies,
    wrk_parser,
)
from fashion.checkpoint import MODEL_NAME  # noqa: E402
from fashion.contract import ModelConfig, build_model, pixels_to_input  # noqa: E402
from service.v2 import HEADER_LENGTH  # noqa: E402
from testing.images import png  # noqa: E402
from testing.models import TOY_MODEL_ENV, save_model  # noqa: E402
from testing.server import start_server  # noqa: E402

INFER_PATH = f"/v2/models/{MODEL_NAME}/infer"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return wrk_parser(__doc__.split("\n\n")[0], duration=5, connections=[32]).parse_args(argv)


# --------------------------------------------------------------------------- request bodies


def v2_json_body(inputs: np.ndarray) -> tuple[bytes, dict]:
    document = {"inputs": [{"name": "input", "shape": list(inputs.shape), "datatype": "FP32",
                            "data": inputs.ravel().tolist()}]}  # fmt: skip
    return json.dumps(document).encode(), {"Content-Type": "application/json"}


def v2_binary_body(inputs: np.ndarray) -> tuple[bytes, dict]:
    raw = inputs.astype("<f4").tobytes()
    document = {
        "inputs": [{"name": "input", "shape": list(inputs.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }  # fmt: skip
    head = json.dumps(document).encode()
    return head + raw, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def v2_image_body(image: bytes) -> tuple[bytes, dict]:
    raw = len(image).to_bytes(4, "little") + image
    document = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(document).encode()
    return head + raw, {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


def write_requests(directory: Path, requests_: list[tuple[bytes, dict]]) -> Path:
    """N.bin and N.headers for each (body, headers): LUA_SCRIPT sends each body with its headers."""
    write_bodies(directory, [body for body, _ in requests_])
    for i, (_, headers) in enumerate(requests_):
        (directory / f"{i}.headers").write_text("".join(f"{k}: {v}\n" for k, v in headers.items()))
    return directory


def check_bodies(url: str, path: str, directory: Path) -> None:
    """Every body must get a 200 before it is timed, or the numbers would measure refusals."""
    for body_file in sorted(directory.glob("*.bin"))[:5]:
        headers = dict(
            line.split(": ", 1) for line in body_file.with_suffix(".headers").read_text().splitlines() if line
        )
        answer = requests.post(url + path, data=body_file.read_bytes(), headers=headers, timeout=10)
        if answer.status_code != 200:
            raise SystemExit(f"{path} refused a benchmark body: {answer.status_code} {answer.text[:300]}")


# --------------------------------------------------------------------------- hook cost


def hook_cost_us(multiprocess: bool, repeats: int = 20_000) -> dict:
    """Microseconds the metrics add to one single-image request: the request hooks' updates and the
    prediction's (latency, batch size, class, confidence), measured on the real Metrics object.

    prometheus-client picks in-process or file-backed values at import, so each mode is measured
    in a fresh interpreter (``python benchmarks/bench_v2.py --hook-cost``)."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    directory = tempfile.mkdtemp(prefix="bench-metrics-") if multiprocess else None
    if directory:
        env["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        command = [sys.executable, str(Path(__file__).resolve()), "--hook-cost", str(repeats)]
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        return {"us_per_request": float(output.strip().splitlines()[-1])}
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


def _hook_cost_here(repeats: int) -> float:
    """hook_cost_us in this process, in whichever mode its environment selects."""
    from fashion.trust import Verdicts
    from service.metrics import Metrics

    metrics = Metrics()
    probabilities = torch.softmax(torch.randn(1, 10), dim=1)
    verdicts = Verdicts(probabilities, [probabilities.max().item()], [None])

    class Model:
        card, version, sha256 = {"name": MODEL_NAME}, "0", "0" * 64

    model = Model()
    for _ in range(1000):
        metrics.observe_request("/predict", "POST", 200, 0.001)
    rounds = []
    for _ in range(5):  # the fastest round: CPU cost, least disturbed by other processes
        started = time.perf_counter()
        for _ in range(repeats):
            time.perf_counter()  # before_request's timestamp
            metrics.observe_prediction(verdicts, 0.0001)
            metrics.observe_request("/predict", "POST", 200, 0.001)
            metrics.observe_model(model)
        rounds.append((time.perf_counter() - started) / repeats * 1e6)
    return min(rounds)


def handler_cost_us(model_dir: Path, bodies: dict, rounds: int = 5, requests_per_round: int = 200) -> dict:
    """In-process CPU time per request of each endpoint (the app's WSGI callable called directly, as
    gunicorn calls it, no HTTP server, one thread; the fastest round), which a loaded machine
    disturbs far less than wrk's throughput."""
    import io

    from werkzeug.test import EnvironBuilder

    from service.app import create_app

    app = create_app({"MODEL_DIR": str(model_dir), "ACCESS_LOG": "false", "TORCH_THREADS": "1", **TOY_MODEL_ENV})
    costs, statuses = {}, []

    def start_response(status, headers, exc_info=None):
        statuses.append(status)

    for name, (path, directory) in bodies.items():
        if name == "ceiling":
            continue
        statuses.clear()
        requests_ = []
        for body_file in sorted(directory.glob("*.bin"))[:requests_per_round]:
            lines = body_file.with_suffix(".headers").read_text().splitlines()
            headers = dict(line.split(": ", 1) for line in lines if line)
            body = body_file.read_bytes()
            requests_.append((body, EnvironBuilder(path=path, method="POST", data=body, headers=headers).get_environ()))
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            for body, environ in requests_:
                for _ in app(dict(environ, **{"wsgi.input": io.BytesIO(body)}), start_response):
                    pass
            best = min(best, (time.perf_counter() - started) / len(requests_) * 1e6)
        assert set(statuses) == {"200 OK"}, (name, set(statuses))
        costs[name] = best
    return costs


# --------------------------------------------------------------------------- main


def model_dir_for(args, work: Path) -> tuple[Path, str]:
    if (args.model_dir / "model.json").is_file():
        return args.model_dir, str(args.model_dir)
    # No trained model yet: the default architecture with random weights costs the same to run.
    torch.manual_seed(0)
    config = ModelConfig()
    save_model(build_model(config), {"architecture": config.to_dict()}, work / "model")
    return work / "model", f"random weights, default architecture {config.hidden_sizes} (no model in {args.model_dir})"


def main(args: argparse.Namespace) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    work = Path(tempfile.mkdtemp(prefix="bench-v2-"))
    model_dir, model_note = model_dir_for(args, work)
    test_set = FashionMNIST(str(args.data_dir), train=False)
    pixels = test_set.data[:200]
    inputs = pixels_to_input(pixels).numpy()
    pngs = [png(p) for p in pixels.numpy()]
    singles = [inputs[i : i + 1] for i in range(len(inputs))]
    script = work / "post.lua"
    script.write_text(LUA_SCRIPT)
    png_headers = {"Content-Type": "image/png"}
    bodies = {
        "ceiling": ("/predict", write_requests(work / "ceiling", [(b, png_headers) for b in pngs])),
        "predict": ("/predict", write_requests(work / "predict", [(b, png_headers) for b in pngs])),
        "v2-json": (INFER_PATH, write_requests(work / "v2-json", [v2_json_body(x) for x in singles])),
        "v2-binary": (INFER_PATH, write_requests(work / "v2-bin", [v2_binary_body(x) for x in singles])),
        "v2-image": (INFER_PATH, write_requests(work / "v2-img", [v2_image_body(b) for b in pngs])),
    }  # fmt: skip

    results: dict = {"workers": args.workers, "duration_s": args.duration, "repeats": args.repeats, "model": model_note}
    # The defaults: access log, metrics; random weights need the probe's floor lowered to be served.
    toy = model_dir != args.model_dir
    service = start_server(model_dir, env=TOY_MODEL_ENV if toy else None, workers=args.workers, log_dir=work)
    ceiling = start_server(None, workers=args.workers, app=CEILING_APP, log_dir=work)
    try:
        for name, (path, directory) in bodies.items():
            check_bodies((ceiling if name == "ceiling" else service).url, path, directory)
        warm_up = argparse.Namespace(**{**vars(args), "duration": 1})
        for name, (path, directory) in bodies.items():  # warm-up: first requests, page faults
            run_wrk(ceiling if name == "ceiling" else service, script, directory, None, 8, warm_up, path)
        table: dict = {}
        for connections in args.connections:
            runs: dict[str, list[dict]] = {name: [] for name in bodies}
            for _ in range(args.repeats):
                for name, (path, directory) in bodies.items():
                    handle = ceiling if name == "ceiling" else service
                    runs[name].append(run_wrk(handle, script, directory, None, connections, args, path))
            table[connections] = {}
            for name, rs in runs.items():
                ratios = [r["rps"] / c["rps"] for r, c in zip(rs, runs["ceiling"], strict=True)]
                table[connections][name] = {
                    "rps": statistics.median(r["rps"] for r in rs),
                    "p50_ms": statistics.median(r["p50_us"] for r in rs) / 1000,
                    "p99_ms": statistics.median(r["p99_us"] for r in rs) / 1000,
                    "ratio_to_ceiling": statistics.median(ratios),
                    "errors": sum(r["failed"] for r in rs),
                    "rps_all": [round(r["rps"]) for r in rs],
                }
        results["single_image"] = table
        results["pss_mb"] = {"service": pss_mb(service), "ceiling": pss_mb(ceiling)}
        scraped = requests.get(service.url + "/metrics", timeout=10).text
        results["metrics_5xx"] = sum(
            float(line.rsplit(" ", 1)[1])
            for line in scraped.splitlines()
            if line.startswith("fashion_http_requests_total{") and 'status="5' in line
        )
    finally:
        service.stop()
        ceiling.stop()
    results["metrics_hooks"] = {"in_process": hook_cost_us(False), "multiprocess": hook_cost_us(True)}
    results["handler_us"] = handler_cost_us(model_dir, bodies)
    shutil.rmtree(work, ignore_errors=True)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def report(results: dict) -> None:
    print(f"\nv2 benchmark: {results['workers']} workers, wrk {results['duration_s']} s x {results['repeats']} "
          f"(interleaved, medians); model: {results['model']}")  # fmt: skip
    for connections, rows in results["single_image"].items():
        print(f"\n{connections} connections, one image per request")
        print(f"{'endpoint':>10} | {'req/s':>7} | {'vs ceiling':>10} | {'p50 ms':>6} | {'p99 ms':>6} | errors")
        for name, row in rows.items():
            print(f"{name:>10} | {row['rps']:>7,.0f} | {row['ratio_to_ceiling']:>10.2f} | {row['p50_ms']:>6.2f} | "
                  f"{row['p99_ms']:>6.2f} | {row['errors']}")  # fmt: skip
    handlers = ", ".join(f"{name} {us:.0f}" for name, us in results["handler_us"].items())
    print(f"\nin-process CPU time per request (us, best of 5 rounds, 1 thread): {handlers}")
    hooks = results["metrics_hooks"]
    multi = hooks["multiprocess"]["us_per_request"]
    share = 100 * multi / results["handler_us"]["predict"]
    print(f"metrics hooks per request: {multi:.1f} us multi-process ({hooks['in_process']['us_per_request']:.1f} us "
          f"in-process) = {share:.1f}% of /predict's in-process CPU time")  # fmt: skip
    print(f"memory (PSS): service {results['pss_mb']['service']:.0f} MB, ceiling {results['pss_mb']['ceiling']:.0f} MB")
    print(f"5xx answers counted by /metrics: {results['metrics_5xx']:.0f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--hook-cost"]:
        print(_hook_cost_here(int(sys.argv[2])))
    else:
        main(parse_args())
