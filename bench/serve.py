"""Benchmark: `tally serve` over HTTP against the same model called in-process, on the CPU, and
the serving limits under load.

Throughput (skip with --load-only): for 1 and 8 concurrent clients it prints requests/s and p50/p99
latency of
1. in-process: decode the encoded image, resize, forward (Predictor), one image per call, clients
   as threads of this process;
2. HTTP: the same images POSTed as raw bytes to a Ray Serve deployment of the same bundle on
   127.0.0.1 (one replica, 1 CPU, serve.batch up to 8 images), clients as threads;
and the ratio HTTP / in-process of requests/s at each concurrency. Both sides run torch on one
thread (Ray gives a 1-CPU replica OMP_NUM_THREADS=1), so they compare the same compute.

Load (the default limits of `tally serve`, platform/README.md "Serving limits"): for --load-seconds, beside two
clients of normal traffic, --slow-uploads clients each send a body one byte every 0.5 s, and one
client sends large requests in turn: 64 images of 1.5 MP (within the 100 MP budget), 64 images of
1.6 MP (over it: 413 from the headers), 2 images of 40 MP, and a 7 KB GIF of 450 frames on a 36 MP
canvas. /health is polled every 0.1 s. It prints the answers by status, /health's max latency,
and the replica's peak RSS against the bound the limits set:
  bound = RSS after start + decoders x 16 bytes x max_pixels + max_ongoing x 3 x max_bytes
(a decode holds at most ~14 bytes per pixel on PIL's RGBA path, ~3 on torchvision's; a request body
is held as bytes, as JSON text and as the decoded images' bytes).

Without --bundle a tiny bundle is trained first (seconds; the model of the tests unless --arch /
--image-size say otherwise). On a shared machine wall times move with the load of other users:
the 1-minute load average is printed.

Run: .venv/bin/python bench/serve.py [--bundle DIR] [--requests 200] [--arch resnet18 --image-size 64]
     .venv/bin/python bench/serve.py --load-only [--load-seconds 40] [--slow-uploads 4]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
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


# ---------------------------------------------------------------- load: the serving limits
def jpeg(width: int, height: int, seed: int) -> bytes:
    """A smooth JPEG (a gradient and a little noise): small file, width x height pixels to decode."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    row = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    col = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    grey = ((row + col) / 2 + rng.normal(0, 2, (height, 1))).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([grey, grey[::-1], 255 - grey], axis=2)).save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def gif_bomb(width: int, height: int, frames: int) -> bytes:
    """A GIF of ``frames`` 1x1 frames on a width x height canvas (tests/data/test_images.py)."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return head + frame * frames + b"\x3b"


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.jpg\"\r\n"
             f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(url: str, data: bytes, kind: str, timeout: float = 300) -> tuple[int, float]:
    """(HTTP status, seconds) of one request; a refused connection or a timeout is status 0."""
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": kind})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError):
        status = 0
    return status, time.perf_counter() - t0


def slow_upload(base: str, size: int, stop: threading.Event) -> tuple[int, float]:
    """Send the headers, then the body one byte every 0.5 s until the server answers."""
    host, port = base.removeprefix("http://").split(":")
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port))) as client:
        client.sendall(f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: image/png\r\n"
                       f"Content-Length: {size}\r\n\r\n".encode())
        client.settimeout(0.5)
        for _ in range(size):
            try:
                answer = client.recv(4096)
                status = int(answer.split(b" ")[1]) if answer else 0
                return status, time.perf_counter() - t0
            except TimeoutError:
                pass
            if stop.is_set():
                break
            try:
                client.sendall(b"\x00")
            except OSError:
                break
    return 0, time.perf_counter() - t0


def load(base: str, payloads: list[bytes], seconds: float, slow_uploads: int) -> dict:
    """Normal traffic, slow uploads, large requests and /health polls at once, for ``seconds``."""
    from collections import Counter

    stop = threading.Event()
    lock = threading.Lock()
    seen = {"normal": Counter(), "slow upload": Counter(), "health": Counter()}
    health_latency, normal_latency, large = [], [], []

    def normal(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            status, dt = post(f"{base}/predict", payloads[rng.integers(len(payloads))], "image/png")
            with lock:
                seen["normal"][status] += 1
                normal_latency.append(dt)

    def slow() -> None:
        while not stop.is_set():
            status, _ = slow_upload(base, 20_000, stop)
            if status or not stop.is_set():  # not the uploads the bench itself cuts at the end
                with lock:
                    seen["slow upload"][status] += 1

    def health() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=30) as response:
                    response.read()
                    status = response.status
            except (urllib.error.URLError, OSError):
                status = 0
            with lock:
                seen["health"][status] += 1
                health_latency.append(time.perf_counter() - t0)
            time.sleep(0.1)

    within = [jpeg(1224, 1224, i) for i in range(64)]  # 64 x 1.498 MP = 95.9 MP <= 100 MP
    over = [jpeg(1265, 1265, i) for i in range(64)]  # 64 x 1.600 MP = 102.4 MP > 100 MP
    huge = [jpeg(7300, 5470, i) for i in range(2)]  # 2 x 39.9 MP
    bomb = gif_bomb(6000, 6000, 450)
    requests = [("64 images, 96 MP", *multipart(within)), ("64 images, 102 MP", *multipart(over)),
                ("2 images, 80 MP", *multipart(huge)), (f"GIF {len(bomb) // 1024} KB, 450 frames", bomb, "image/gif")]

    def large_requests() -> None:
        turn = 0
        while not stop.is_set():
            name, data, kind = requests[turn % len(requests)]
            status, dt = post(f"{base}/predict", data, kind)
            with lock:
                large.append((name, len(data), status, dt))
            turn += 1

    threads = [threading.Thread(target=normal, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=slow) for _ in range(slow_uploads)]
    threads += [threading.Thread(target=health), threading.Thread(target=large_requests)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return {"seen": seen, "health_latency": np.array(health_latency), "normal_latency": np.array(normal_latency),
            "large": large}


def stats(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/stats", timeout=120) as response:
        return json.loads(response.read())


def print_load(result: dict, rss_start: float, rss_peak: float, seconds: float, slow_uploads: int) -> None:
    from tally.deploy import serve as limits

    bound = (rss_start + (limits.DEFAULT_DECODERS * 16 * limits.DEFAULT_MAX_PIXELS
                          + limits.DEFAULT_MAX_ONGOING * 3 * limits.DEFAULT_MAX_BYTES) / 2**20)
    print(f"\nload: {seconds:g} s, 2 normal clients, {slow_uploads} slow uploads (1 byte / 0.5 s), 1 client of "
          f"large requests, /health every 0.1 s; limits: the defaults of tally serve")
    for kind, counts in result["seen"].items():
        print(f"{kind:<12s} answers by status: {dict(sorted(counts.items()))}")
    lat = result["normal_latency"]
    if len(lat):
        print(f"normal requests: p50 {1e3 * np.percentile(lat, 50):.0f} ms, p99 {1e3 * np.percentile(lat, 99):.0f} ms")
    h = result["health_latency"]
    print(f"/health: {len(h)} polls, max latency {1e3 * h.max():.0f} ms, p99 {1e3 * np.percentile(h, 99):.0f} ms "
          f"({'within' if h.max() < 1.0 else 'OVER'} 1 s)")
    for name, size, status, dt in result["large"]:
        print(f"large request {name:<24s} {size / 2**20:6.2f} MiB body -> {status} in {dt:.1f} s")
    print(f"replica peak RSS {rss_peak:.0f} MiB (after start {rss_start:.0f} MiB); bound from the limits "
          f"{bound:.0f} MiB: {'within' if rss_peak <= bound else 'OVER'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="an exported bundle (default: train a tiny one)")
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement")
    parser.add_argument("--arch", default="resnet10")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--load-only", action="store_true", help="skip the throughput rows")
    parser.add_argument("--load-seconds", type=float, default=40.0)
    parser.add_argument("--slow-uploads", type=int, default=4, help="slow-upload clients during the load")
    args = parser.parse_args()
    os.environ.setdefault("TALLY_CACHE", tempfile.mkdtemp(prefix="tally-bench-cache-"))
    torch.set_num_threads(1)

    from tally.data import load_splits
    from tally.deploy.export import Predictor
    from tally.deploy.serve import decode_image_bytes

    rows = []
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

        if not args.load_only:
            rows += [("in-process", c, measure(in_process, payloads, c)) for c in (1, 8)]

        import ray
        from ray import serve

        from tally.cluster import start_or_join
        from tally.deploy.serve import start

        start_or_join(num_cpus=2)  # loopback, token auth on, as `tally serve`
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = start(bundle, port=port, cpus=1, max_batch_size=8)
        url = base + "/predict"

        def over_http(data: bytes) -> None:
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "image/png"})
            with urllib.request.urlopen(req, timeout=60) as response:
                assert response.status == 200
                response.read()

        try:
            post(url, payloads[0], "image/png")
            rss_start = stats(base)["peak_rss_mib"]
            if not args.load_only:
                rows += [("HTTP (Ray Serve)", c, measure(over_http, payloads, c)) for c in (1, 8)]
            result = load(base, payloads, args.load_seconds, args.slow_uploads)
            rss_peak = stats(base)["peak_rss_mib"]
        finally:
            serve.shutdown()
            ray.shutdown()

    arch = f"{predictor.net.arch} at {predictor.image_size} px"
    print(f"\nbench/serve.py: {arch}, {args.requests} requests per row, CPU, torch threads 1, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if rows:
        print(f"{'mode':<18s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
        for mode, clients, m in rows:
            print(f"{mode:<18s} {clients:>7d} {m['rps']:>8.1f} {m['p50']:>8.2f} {m['p99']:>8.2f}")
        by = {(mode, c): m for mode, c, m in rows}
        for c in (1, 8):
            ratio = by[("HTTP (Ray Serve)", c)]["rps"] / by[("in-process", c)]["rps"]
            print(f"ratio HTTP / in-process requests/s at {c} client(s): {ratio:.3f}")
    print_load(result, rss_start, rss_peak, args.load_seconds, args.slow_uploads)
    return 0

if __name__ == "__main__":
    sys.exit(main())
