"""Front-door benchmark: what the proxy costs, and what the attacks of issue 8 do, with and without it.

    python benchmarks/bench_proxy.py                    # compose stack: wrk through the proxy vs gunicorn direct
    python benchmarks/bench_proxy.py --attacks          # ... and the attacks against both
    python benchmarks/bench_proxy.py --attack-only URL  # only the attacks, against any server (e.g. `make serve`)

The stack is docker-compose.yml plus benchmarks/compose.direct.yaml (the api also published on loopback),
one api replica with WORKERS workers, under the compose project $BENCH_COMPOSE_PROJECT
(fashion-mnist-bench); it is taken down at the end. wrk POSTs real Fashion-MNIST test images as PNG
bodies to /predict, through the proxy and direct in turn (interleaved), and the medians are printed.
Needs a Docker-compatible engine and wrk. Loopback only; every attack is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

import requests  # noqa: E402

from benchmarks.bench_serving import LUA_SCRIPT, write_bodies  # noqa: E402
from testing.attacks import (  # noqa: E402
    BIG_BODY,
    BIG_BODY_SENT,
    SlowClients,
    bomb_request,
    bombs_beside_a_normal_client,
    hold_connections,
    probe,
    small_png,
)
from testing.server import free_port  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers of the one api replica")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per target (median reported)")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--attacks", action="store_true", help="also run the attacks against proxy and direct")
    parser.add_argument("--attack-only", metavar="URL", help="only run the attacks against this server")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- attacks


def answer_status(answer: bytes) -> str:
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"


def attack_suite(url: str, slow_clients: int) -> dict:
    """The issue's attacks against ``url``: what a normal client sees meanwhile, and what the attacker gets."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    png = small_png()
    results: dict = {"url": url}

    # Slow clients (one byte or header line every 2 s): headers, small bodies and bodies that send more
    # than the proxy's 64 KiB buffer at once first, ``slow_clients`` of each; then 5 normal requests over
    # 15 s, each allowed 15 s.
    slow = SlowClients(host, port, headers=slow_clients, bodies=slow_clients, big_bodies=slow_clients, seconds=20)
    slow.start()
    time.sleep(1)
    answers = probe(url, png, count=5, interval=3.0, timeout=15)
    outcomes = slow.join()
    results["slow_clients"] = {
        "clients_per_kind": slow_clients,
        "normal_answered": sum(status == 200 for status, _ in answers),
        "normal_max_s": max(seconds for _, seconds in answers),
        # kind -> how each slow client ended (its answer's status, or "closed" without one), and the
        # longest it held its connection
        "slow": {
            kind: {
                "ended": dict(Counter(answer_status(o.answer) for o in outcomes if o.kind == kind)),
                "max_s": max((o.seconds for o in outcomes if o.kind == kind), default=None),
            }
            for kind in ("header", "body", "big_body")
        },
    }

    # The 64-image bomb, alone, then two at once while a normal client asks.
    results["bomb_body_bytes"] = len(bomb_request()[0])

    def summary(answer) -> tuple:
        if isinstance(answer, requests.Response):
            return answer.status_code, answer.headers.get("Content-Type", "").split(";")[0]
        return type(answer).__name__, ""

    single, seconds, _ = bombs_beside_a_normal_client(url, bombs=1, normal=0, timeout=90)
    status, kind = summary(single[0])
    results["bomb"] = {"status": status, "content_type": kind, "seconds": seconds[0]}
    pair, seconds, answers = bombs_beside_a_normal_client(
        url, bombs=2, normal=5, interval=1.0, timeout=90, normal_timeout=15
    )
    results["two_bombs"] = {
        "statuses": [summary(answer)[0] for answer in pair],
        "seconds": seconds,
        "normal_answered": sum(status == 200 for status, _ in answers),
        "normal_max_s": max(seconds for _, seconds in answers),
    }

    # A 20 MB body.
    started = time.monotonic()
    try:
        response = requests.post(
            url + "/predict", data=b"\0" * (20 * 1024 * 1024), headers={"Content-Type": "image/png"}, timeout=90
        )
        outcome = (response.status_code, response.headers.get("Content-Type", "").split(";")[0])
    except requests.RequestException as error:
        outcome = (type(error).__name__, "")
    results["body_20mb"] = {
        "status": outcome[0],
        "content_type": outcome[1],
        "seconds": round(time.monotonic() - started, 3),
    }

    # 500 connections from one address, each asking GET /healthz.
    started = time.monotonic()
    tally = hold_connections(host, port, 500, seconds=20)
    results["connections_500"] = {str(k): v for k, v in tally.items()} | {
        "seconds": round(time.monotonic() - started, 2)
    }
    time.sleep(1)
    results["after"] = probe(url, png, count=3, interval=0.5, timeout=15)
    return results


# --------------------------------------------------------------------------- wrk, proxy vs direct


def run_wrk(url: str, script: Path, body_dir: Path, args) -> dict:
    env = {"BODY_DIR": str(body_dir), "REQUEST_PATH": "/predict", "CONTENT_TYPE": "image/png", "PATH": "/usr/bin:/bin"}
    command = [
        "wrk",
        f"-t{args.wrk_threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url + "/predict",
    ]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["failed"] = sum(result["errors"].values())
    return result


def test_bodies(directory: Path, count: int = 256) -> Path:
    from torchvision.datasets import FashionMNIST

    from benchmarks.bench_serving import png

    data_dir = Path(os.environ.get("FASHION_DATA") or PROJECT_ROOT / "data")
    images = FashionMNIST(str(data_dir), train=False, download=False).data[:count].numpy()
    return write_bodies(directory, [png(image) for image in images])


def docker_stats_memory(container: str) -> float:
    """Bytes of memory the engine counts for ``container`` (its cgroup), from `docker stats`."""
    raw = (
        subprocess.run(
            ["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}", container],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.split("/")[0]
        .strip()
    )
    number = raw.rstrip("KMGTiBkb")
    unit = raw[len(number) :]
    scale = {"B": 1, "kB": 1e3, "KiB": 2**10, "MB": 1e6, "MiB": 2**20, "GB": 1e9, "GiB": 2**30}[unit]
    return float(number) * scale


def proxy_memory(env: dict, port: int, connections: int = 500, uploads: int = 64) -> dict:
    """The proxy container's memory (cgroup), idle, with ``connections`` from one address holding
    unfinished headers (each one a request buffer in HAProxy), and with ``uploads`` bodies past the 64 KiB
    buffer stalled half-way (HAProxy's buffers plus nginx's spool files on the tmpfs)."""
    project = env.get("BENCH_COMPOSE_PROJECT", "fashion-mnist-bench")
    container = subprocess.run(
        ["docker", "compose", "-p", project, "ps", "-q", "proxy"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    def mib() -> float:
        usage = docker_stats_memory(container)
        return round(usage / 2**20, 1)

    results = {"idle_mib": mib()}
    for name, count, first in (
        ("headers", connections, b"GET /healthz HTTP/1.1\r\nHost: memory\r\n"),
        ("uploads", uploads, None),
    ):
        sockets = []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sockets.append(sock)
                if first is not None:
                    sock.sendall(first)
                else:
                    sock.sendall(
                        b"POST /predict HTTP/1.1\r\nHost: memory\r\nContent-Type: image/png\r\n"
                        b"Content-Length: %d\r\n\r\n" % BIG_BODY + b"\0" * BIG_BODY_SENT
                    )
            time.sleep(3)  # well within the proxy's 10 s request timeout
            results[f"{name}_{count}_mib"] = mib()
        finally:
            for sock in sockets:
                sock.close()
        time.sleep(1)
    return results


def compose(env: dict, *args: str, timeout: float = 1800) -> None:
    files = ["-f", "docker-compose.yml", "-f", "benchmarks/compose.direct.yaml"]
    project = env.get("BENCH_COMPOSE_PROJECT", "fashion-mnist-bench")
    subprocess.run(
        ["docker", "compose", "-p", project, *files, *args], cwd=PROJECT_ROOT, env=env, check=True, timeout=timeout
    )


def main(args: argparse.Namespace) -> dict:
    if args.attack_only:
        return {"attacks": {"target": attack_suite(args.attack_only.rstrip("/"), slow_clients=2 * args.workers)}}
    proxy_port, direct_port = free_port(), free_port()
    env = {
        **os.environ,
        "API_BIND": "127.0.0.1",
        "API_PORT": str(proxy_port),
        "API_DIRECT_PORT": str(direct_port),
        "API_REPLICAS": "1",
        "WORKERS": str(args.workers),
        "TORCH_INDEX_URL": os.environ.get("TORCH_INDEX_URL", ""),
    }
    targets = {"proxy": f"http://127.0.0.1:{proxy_port}", "direct": f"http://127.0.0.1:{direct_port}"}
    results: dict = {"workers": args.workers, "connections": args.connections, "duration_s": args.duration}
    compose(env, "up", "-d", "--build", "--wait", "--wait-timeout", "300", "api", "proxy")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "post.lua"
            script.write_text(LUA_SCRIPT)
            bodies = test_bodies(Path(tmp) / "bodies")
            for url in targets.values():  # warm both paths
                requests.post(
                    url + "/predict", data=(bodies / "0.bin").read_bytes(), headers={"Content-Type": "image/png"}
                )
            runs: dict[str, list[dict]] = {name: [] for name in targets}
            for _ in range(args.repeats):
                for name, url in targets.items():
                    runs[name].append(run_wrk(url, script, bodies, args))
        results["wrk"] = {
            name: {
                "rps": statistics.median(r["rps"] for r in rs),
                "p50_ms": statistics.median(r["p50_us"] for r in rs) / 1000,
                "p99_ms": statistics.median(r["p99_us"] for r in rs) / 1000,
                "failed": sum(r["failed"] for r in rs),
            }
            for name, rs in runs.items()
        }
        if args.attacks:
            results["attacks"] = {
                name: attack_suite(url, slow_clients=6 * args.workers) for name, url in targets.items()
            }
            results["proxy_memory"] = proxy_memory(env, proxy_port)
    finally:
        compose(env, "down", "--timeout", "10", timeout=300)
    return results


def report(results: dict) -> None:
    if "wrk" in results:
        print(
            f"\nproxy cost: 1 api replica, {results['workers']} workers, wrk c={results['connections']}, "
            f"{results['duration_s']} s runs interleaved, medians"
        )
        print(f"{'':8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
        for name, row in results["wrk"].items():
            print(f"{name:8} {row['rps']:8.0f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} {row['failed']:7d}")
        proxy, direct = results["wrk"]["proxy"], results["wrk"]["direct"]
        print(
            f"proxy/direct: {proxy['rps'] / direct['rps']:.2f} of the req/s, "
            f"p99 {proxy['p99_ms'] / direct['p99_ms']:.2f}x"
        )
    if "proxy_memory" in results:
        print(f"\nproxy container memory: {results['proxy_memory']}")
    for name, attack in results.get("attacks", {}).items():
        print(f"\nattacks against {name} ({attack['url']}):")
        for key, value in attack.items():
            if key != "url":
                print(f"  {key}: {value}")


if __name__ == "__main__":
    arguments = parse_args()
    outcome = main(arguments)
    report(outcome)
    if arguments.json:
        arguments.json.write_text(json.dumps(outcome, indent=2) + "\n")
