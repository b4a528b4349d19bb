"""Services side by side: several checkouts or model folders under wrk in one run, interleaved.

    # this commit against an older one (git worktree add /tmp/before ec353bd)
    python benchmarks/bench_compare.py --service before /tmp/before models --service after . models --batch
    # two models through the same service
    python benchmarks/bench_compare.py --service mlp . models --service cnn . models-cnn --batch

Each ``--service NAME ROOT MODEL_DIR`` is the service of the checkout at ROOT (its own gunicorn
config and code) serving MODEL_DIR, on its defaults (access line and metrics on), 2 workers. The
runs alternate between the services, so load from other processes hits all alike; medians are
printed: requests/s and p99 for single PNG images, worker CPU per request, and with ``--batch``
images/s in multipart batches of 64, as bench_serving.py measures them. ``--held``: how long a
client waits for its answer while as many clients as there are workers, answered already, keep
their connections open (testing.attacks.next_client_beside_held_connections), median of 5.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from torchvision.datasets import FashionMNIST

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_serving import BOUNDARY, LUA_SCRIPT, bench_bodies, medians, run_wrk, warm_up, wrk_parser
from testing.attacks import next_client_beside_held_connections
from testing.server import ServerHandle, start_server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = wrk_parser(__doc__.split("\n\n")[0], duration=6, connections=[32])
    parser.add_argument(
        "--service",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "ROOT", "MODEL_DIR"),
        help="a service to compare: a name, the checkout to serve from, the model folder",
    )
    parser.add_argument("--batch", action="store_true", help="also time multipart batches of 64 at 4 connections")
    parser.add_argument(
        "--held", action="store_true", help="also time a client's answer while answered clients keep connections open"
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    pixels = FashionMNIST(str(args.data_dir), train=False).data.numpy()
    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    script = work / "post.lua"
    script.write_text(LUA_SCRIPT)
    singles, batches = bench_bodies(work, pixels, 64)
    servers: dict[str, ServerHandle] = {}
    runs: dict[str, dict[str, list[dict]]] = {}
    try:
        for name, root, model_dir in args.service:
            servers[name] = start_server(
                Path(model_dir).resolve(), workers=args.workers, log_dir=work, root=Path(root).resolve()
            )
            warm_up(servers[name], pixels)
            runs[name] = {"single": [], "batch": [], "held": []}
        for _ in range(args.repeats):
            for name, handle in servers.items():
                runs[name]["single"].append(run_wrk(handle, script, singles, "image/png", args.connections[0], args))
                if args.batch:
                    content_type = f"multipart/form-data; boundary={BOUNDARY}"
                    runs[name]["batch"].append(run_wrk(handle, script, batches, content_type, 4, args))
        if args.held:
            for name, handle in servers.items():
                runs[name]["held"] = next_client_beside_held_connections("127.0.0.1", handle.port, args.workers)
    finally:
        for handle in servers.values():
            handle.stop()
        shutil.rmtree(work, ignore_errors=True)
    results = {name: summary(measured) for name, measured in runs.items()}
    print(f"\n{args.workers} workers each, wrk {args.duration} s x {args.repeats} interleaved, medians")
    for name, r in results.items():
        line = (
            f"{name:>16}: {r['rps']:>7,.0f} req/s at {args.connections[0]} connections, p99 {r['p99_ms']:.1f} ms, "
            f"worker CPU {r['cpu_us_per_request']:.0f} us/request; slowest run {min(r['rps_all']):,} req/s, "
            f"connections per worker in each run: {' '.join('/'.join(map(str, split)) for split in r['splits'])}"
        )
        if args.batch:
            line += f"; batches of 64: {r['images_per_s']:,.0f} images/s"
        if args.held:
            line += f"; next client beside {args.workers} held connections: {r['held_s'] * 1000:,.1f} ms"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def summary(measured: dict[str, list[dict]]) -> dict:
    """bench_serving's medians of the single-image runs, with the batches' images/s."""
    single, batch, held = measured["single"], measured["batch"], measured["held"]
    return {
        **medians(single),
        "failed": sum(r["failed"] for r in single + batch),
        "images_per_s": statistics.median(r["rps"] for r in batch) * 64 if batch else None,
        "held_s": statistics.median(held) if held else None,
        "held_all_s": held,
    }


if __name__ == "__main__":
    main(parse_args())
