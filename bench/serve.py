"""Benchmark: `tally serve` over HTTP against the same model called in-process, on the CPU.

For 1 and 8 concurrent clients it prints requests/s and p50/p99 latency of
1. in-process: decode the encoded image, resize, forward (Predictor), one image per call, clients
   as threads of this process;
2. HTTP: the same images POSTed as raw bytes to a Ray Serve deployment of the same bundle on
   127.0.0.1 (one replica, 1 CPU, serve.batch up to 8 images), clients as threads;
and the ratio HTTP / in-process of requests/s at each concurrency. Both sides run torch on one
thread (Ray gives a 1-CPU replica OMP_NUM_THREADS=1), so they compare the same compute.

Without --bundle a tiny bundle is trained first (seconds; the model of the tests unless --arch /
--image-size say otherwise). On a shared machine wall times move with the load of other users:
the 1-minute load average is printed.

Run: .venv/bin/python bench/serve.py [--bundle DIR] [--requests 200] [--arch resnet18 --image-size 64]
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_bundle(tmp: Path, arch: str, image_size: int) -> Path:
    import tests.bundle_factory as bf
    from tally.deploy.export import export_bundle

    bf.TINY_CONFIG = copy.deepcopy(bf.TINY_CONFIG)
    bf.TINY_CONFIG["model"]["arch"] = arch
    bf.TINY_CONFIG["data"]["image_size"] = image_size
    return export_bundle(bf.tiny_run(tmp / "run"), tmp / "bundle")


def measure(call, payloads: list[bytes], clients: int) -> dict:
    """Every payload once, from ``clients`` threads; per-call latencies and overall throughput."""
    def timed(data: bytes) -> float:
        t0 = time.perf_counter()
        call(data)
        return time.perf_counter() - t0

    for data in payloads[:clients * 2]:  # warm-up
        call(data)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = np.array(list(pool.map(timed, payloads)))
    wall = time.perf_counter() - t0
    return {"rps": len(payloads) / wall, "p50": 1e3 * np.percentile(latencies, 50),
            "p99": 1e3 * np.percentile(latencies, 99)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="an exported bundle (default: train a tiny one)")
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement")
    parser.add_argument("--arch", default="resnet10")
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("TALLY_CACHE", tempfile.mkdtemp(prefix="tally-bench-cache-"))
    torch.set_num_threads(1)

    from tally.data import load_splits
    from tally.deploy.export import Predictor
    from tally.deploy.serve import decode_image_bytes

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(args.bundle) if args.bundle else make_bundle(Path(tmp), args.arch, args.image_size)
        predictor = Predictor(bundle, device="cpu")
        config = predictor.bundle / "config.yaml"
        import yaml

        data_cfg = yaml.safe_load(config.read_text())["data"]
        paths = load_splits(data_cfg)["test_sub"].paths
        payloads = [Path(paths[i % len(paths)]).read_bytes() for i in range(args.requests)]

        def in_process(data: bytes) -> None:
            predictor.probabilities(predictor.prepare(decode_image_bytes(data, 40_000_000))[None])

        rows = [("in-process", c, measure(in_process, payloads, c)) for c in (1, 8)]

        import ray
        from ray import serve

        from tally.cluster import start_or_join
        from tally.deploy.serve import start

        start_or_join(num_cpus=2)  # loopback, token auth on, as `tally serve`
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = start(bundle, port=port, cpus=1, max_batch_size=8) + "/predict"

        def over_http(data: bytes) -> None:
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "image/png"})
            with urllib.request.urlopen(req, timeout=60) as response:
                assert response.status == 200
                response.read()

        try:
            rows += [("HTTP (Ray Serve)", c, measure(over_http, payloads, c)) for c in (1, 8)]
        finally:
            serve.shutdown()
            ray.shutdown()

    arch = f"{predictor.net.arch} at {predictor.image_size} px"
    print(f"\nbench/serve.py: {arch}, {args.requests} requests per row, CPU, torch threads 1, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'mode':<18s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for mode, clients, m in rows:
        print(f"{mode:<18s} {clients:>7d} {m['rps']:>8.1f} {m['p50']:>8.2f} {m['p99']:>8.2f}")
    by = {(mode, c): m for mode, c, m in rows}
    for c in (1, 8):
        ratio = by[("HTTP (Ray Serve)", c)]["rps"] / by[("in-process", c)]["rps"]
        print(f"ratio HTTP / in-process requests/s at {c} client(s): {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
