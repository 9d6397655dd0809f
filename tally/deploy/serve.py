"""`tally serve BUNDLE`: a bundle behind HTTP on Ray Serve, with request batching.

Routes
- GET  /health  -> {"status": "ok", "bundle": id, "classes": [...], "limits": {...}}, from a deployment
  of its own that does no work: it answers while every model replica is busy or held by slow uploads.
- GET  /stats   -> {"bundle", "device", "served": {...}, "peak_rss_mib"}: one model replica's counters.
- POST /predict -> {"bundle": id, "predictions": [{"label", "confidence", "top_k", "probabilities"}]}
  The body is one image as raw bytes (any image/* or application/octet-stream content type), a
  multipart form with one or more files, or JSON {"image": "<base64>"} / {"images": [...]}.

Every image of every request goes through one ``serve.batch`` method, so concurrent requests share
forward passes. Requests are untrusted; each limit answers a one-line {"error": ...} 4xx/503 and the
replica keeps serving (platform/README.md "Serving limits"):
- a body over ``max_bytes`` is refused before it is read in full (413), a body not received within
  ``body_timeout_s`` is dropped (408), and a request not answered within ``request_timeout_s`` gets 503;
- at most MAX_IMAGES_PER_REQUEST images, counted before any is decoded (413);
- every image's header is read before any image is decoded: over ``max_pixels`` one image, or over
  ``max_request_pixels`` all together, the request is refused (413);
- images are decoded by ``decoders`` threads per replica, so decoded pixels in memory stay bounded;
- Ray Serve admits ``max_ongoing`` requests per replica and queues ``max_queued`` more per proxy;
  past that it answers 503 at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from tally.data.images import ImageError, decode_image, image_size
from tally.errors import TallyError

if TYPE_CHECKING:  # torch is imported by the model replicas only: the /health replica stays small
    import torch

DEFAULT_MAX_BYTES = 16 * 2**20
DEFAULT_MAX_PIXELS = 40_000_000  # one image, about 8000 x 5000
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000  # all images of one request together
DEFAULT_BODY_TIMEOUT_S = 20.0
DEFAULT_REQUEST_TIMEOUT_S = 60.0
DEFAULT_DECODERS = 2  # decoding threads per replica
DEFAULT_MAX_ONGOING = 8  # requests a replica works on at once (Ray Serve's max_ongoing_requests)
DEFAULT_MAX_QUEUED = 32  # requests waiting for a replica, per proxy (Ray Serve's max_queued_requests)
MAX_IMAGES_PER_REQUEST = 64


class BadRequest(Exception):
    """A client error: HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def decode_image_bytes(data: bytes, max_pixels: int, name: str = "image") -> torch.Tensor:
    """uint8 (3, H, W) RGB of the first frame (tally.data.images.decode_image, the project's one decoder);
    its refusals become BadRequest with their HTTP status."""
    try:
        return decode_image(data, name, max_pixels, hint=" (--max-pixels)")
    except ImageError as e:
        raise BadRequest(e.status, str(e)) from None


def check_pixels(encoded: list[bytes], max_pixels: int, max_request_pixels: int) -> None:
    """Every image's header against the per-image limit, then their sum against the per-request budget,
    before anything is decoded."""
    total = 0
    for i, data in enumerate(encoded):
        try:
            width, height, _ = image_size(data, f"image {i + 1}", max_pixels, hint=" (--max-pixels)")
        except ImageError as e:
            raise BadRequest(e.status, str(e)) from None
        total += width * height
    if total > max_request_pixels:
        raise BadRequest(413, f"the request's {len(encoded)} images hold {total} pixels together; the limit is "
                              f"{max_request_pixels} per request (--max-request-pixels)")


async def _read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The body, at most ``max_bytes``, received within ``timeout_s`` (a slow client holds a slot)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(413, f"request body is {int(declared)} bytes; the limit is {max_bytes}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise BadRequest(413, f"request body is over the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequest(408, f"request body not received within {timeout_s:g} s") from None
    return b"".join(chunks)


def _json_images(body: bytes) -> list[bytes]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # bad JSON, an integer of thousands of digits, deep nesting
        raise BadRequest(400, "body is not valid JSON (or nests too deep, or holds a number too long)") from None
    items = payload.get("images", [payload.get("image")]) if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise BadRequest(400, 'JSON body must be {"image": "<base64>"} or {"images": ["<base64>", ...]}')
    _check_count(len(items))
    try:
        return [base64.b64decode(item, validate=True) for item in items]
    except (binascii.Error, ValueError):
        raise BadRequest(400, "an image is not valid base64") from None


def _check_count(n: int) -> None:
    if n > MAX_IMAGES_PER_REQUEST:
        raise BadRequest(413, f"{n} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}")


async def _multipart_images(request: Request, body: bytes, max_bytes: int) -> list[bytes]:
    async def replay():  # the body was already read (size-checked): hand it to the form parser
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=MAX_IMAGES_PER_REQUEST,
                                                         max_fields=MAX_IMAGES_PER_REQUEST, max_part_size=max_bytes)
    except Exception as e:  # starlette's parser errors on malformed forms
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise BadRequest(400, f"malformed multipart body: {reason}") from None
    try:  # the parser's temporary files are closed whatever happens next
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise BadRequest(400, "multipart body holds no file")
        _check_count(len(files))
        return [await f.read() for f in files]
    finally:
        await form.close()


async def _images_in(request: Request, max_bytes: int, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
                     ) -> list[bytes]:
    """The encoded images of a request body, by content type; the count is checked before base64 or
    image decoding."""
    body = await _read_body(request, max_bytes, body_timeout_s)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        return _json_images(body)
    if kind == "multipart/form-data":
        return await _multipart_images(request, body, max_bytes)
    if not body:
        raise BadRequest(400, "empty body: send an image")
    return [body]


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100)
class Health:
    """GET /health: a fixed answer from a replica of its own, never queued behind the model's requests."""

    def __init__(self, answer: dict):
        self.answer = answer

    async def __call__(self, request: Request) -> JSONResponse:
        return JSONResponse(self.answer)


@serve.deployment
class BundleServer:
    """One replica: a verified bundle's network; images of concurrent requests share forward passes."""

    def __init__(self, bundle: str, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, decoders: int = DEFAULT_DECODERS,
                 top_k: int = 5, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005):
        from tally.deploy.export import Predictor

        self.predictor = Predictor(bundle, device="auto")  # a replica without GPUs sees none
        self.max_bytes, self.max_pixels = int(max_bytes), int(max_pixels)
        self.max_request_pixels = int(max_request_pixels)
        self.body_timeout_s, self.request_timeout_s = float(body_timeout_s), float(request_timeout_s)
        # decoded images are the replica's largest allocations: a fixed number of threads bounds them
        self.decoders = ThreadPoolExecutor(max_workers=int(decoders), thread_name_prefix="decode")
        self.top_k = max(1, min(int(top_k), len(self.predictor.classes)))
        self.classes = [str(c) for c in self.predictor.classes]
        self.classify.set_max_batch_size(max_batch_size)
        self.classify.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.stats = {"images": 0, "batches": 0, "largest_batch": 0, "bad_requests": 0}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def classify(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch

        self.stats["batches"] += 1
        self.stats["images"] += len(images)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(images))
        probs = await asyncio.to_thread(self.predictor.probabilities, torch.stack(images))
        return list(probs)

    def _answer(self, probs: torch.Tensor) -> dict:
        top = probs.topk(self.top_k)
        values, indices = top.values.tolist(), top.indices.tolist()
        return {"label": self.classes[indices[0]], "confidence": values[0],
                "top_k": [{"label": self.classes[i], "probability": p} for i, p in zip(indices, values, strict=True)],
                "probabilities": dict(zip(self.classes, probs.tolist(), strict=True))}

    def _prepare(self, data: bytes, name: str) -> torch.Tensor:
        return self.predictor.prepare(decode_image_bytes(data, self.max_pixels, name))

    async def _predict(self, request: Request) -> JSONResponse:
        encoded = await _images_in(request, self.max_bytes, self.body_timeout_s)
        check_pixels(encoded, self.max_pixels, self.max_request_pixels)
        loop = asyncio.get_running_loop()
        # decoding runs in the replica's decoder threads: the event loop keeps accepting requests meanwhile
        images = await asyncio.gather(*(loop.run_in_executor(self.decoders, self._prepare, data, f"image {i + 1}")
                                        for i, data in enumerate(encoded)))
        probs = await asyncio.gather(*(self.classify(image) for image in images))
        return JSONResponse({"bundle": self.predictor.bundle_id, "predictions": [self._answer(p) for p in probs]})

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        if path == "/stats":
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            return JSONResponse({"bundle": self.predictor.bundle_id, "device": str(self.predictor.device),
                                 "served": self.stats, "peak_rss_mib": round(peak, 1)})
        if path != "/predict":
            return JSONResponse({"error": f"no route {path}: POST /predict, GET /health or /stats"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": "POST an image to /predict"}, status_code=405)
        try:
            # the replica's own deadline: Ray's proxy timeout can be switched off by a request header
            async with asyncio.timeout(self.request_timeout_s):
                return await self._predict(request)
        except BadRequest as e:
            self.stats["bad_requests"] += 1
            return JSONResponse({"error": e.reason}, status_code=e.status)
        except TimeoutError:
            self.stats["bad_requests"] += 1
            return JSONResponse({"error": f"not answered within {self.request_timeout_s:g} s: the server is busy, "
                                          "retry later"}, status_code=503)


def build_app(bundle: str | Path, replicas: int = 1, gpus: float = 0.0, cpus: float = 1.0,
              max_ongoing: int = DEFAULT_MAX_ONGOING, max_queued: int = DEFAULT_MAX_QUEUED, **options):
    """The Serve application of one bundle (``options`` go to BundleServer)."""
    if replicas < 1:
        raise TallyError(f"--replicas: expected an integer >= 1, got {replicas}")
    if gpus < 0 or cpus < 0:
        raise TallyError(f"--gpus/--cpus: expected numbers >= 0, got {gpus}/{cpus}")
    if max_ongoing < 1 or max_queued < 0:
        raise TallyError(f"--max-ongoing/--max-queued: expected >= 1 / >= 0, got {max_ongoing}/{max_queued}")
    return BundleServer.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                                max_ongoing_requests=int(max_ongoing), max_queued_requests=int(max_queued),
                                ).bind(str(Path(bundle).resolve()), **options)


def health_app(bundle: str | Path, **options):
    """The /health application: the bundle's id and classes and the limits, read once here (the bundle
    was verified by the caller), so its replica loads no model."""
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    classes = json.loads((Path(bundle) / "labels.json").read_text())["classes"]
    limits = {"max_bytes": DEFAULT_MAX_BYTES, "max_pixels": DEFAULT_MAX_PIXELS,
              "max_request_pixels": DEFAULT_MAX_REQUEST_PIXELS, "max_images": MAX_IMAGES_PER_REQUEST,
              "body_timeout_s": DEFAULT_BODY_TIMEOUT_S, "request_timeout_s": DEFAULT_REQUEST_TIMEOUT_S,
              "decoders": DEFAULT_DECODERS, "max_ongoing": DEFAULT_MAX_ONGOING, "max_queued": DEFAULT_MAX_QUEUED}
    limits.update({k: v for k, v in options.items() if k in limits})
    answer = {"status": "ok", "bundle": f"{manifest.get('trial')}@{manifest['sha256']['model.pt'][:12]}",  # as Predictor
              "classes": [str(c) for c in classes], "limits": limits}
    return Health.bind(answer)


def _deploy(bundle: str | Path, app, host: str, port: int, options: dict) -> None:
    timeout = float(options.get("request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S))
    # Ray's proxy deadline is a backstop past the replica's own (a request header can lift the proxy's)
    serve.start(http_options={"host": host, "port": int(port), "request_timeout_s": timeout + 5})
    serve.run(health_app(bundle, **options), name="tally-health", route_prefix="/health", blocking=False)
    serve.run(app, name="tally", route_prefix="/", blocking=False)


def start(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          replicas: int = 1, gpus: float = 0.0, cpus: float = 1.0, **options) -> str:
    """Verify the bundle, start (or join) Ray and Serve, deploy; returns the base URL. Does not block."""
    from tally.cluster import start_or_join
    from tally.deploy.export import verify_bundle

    verify_bundle(bundle)  # a bad bundle fails here, in one line, before Ray starts
    app = build_app(bundle, replicas=replicas, gpus=gpus, cpus=cpus, **options)
    start_or_join(address)  # loopback and Ray's token auth for a local Ray; a cluster's token required
    _deploy(bundle, app, host, port, options)
    return f"http://{host}:{port}"


def serve_forever(bundle: str | Path, **kwargs) -> int:
    """`tally serve`: start, then wait until Ctrl-C or SIGTERM (what Kubernetes sends); Serve, and the
    local Ray this command started, are shut down on the way out."""
    import signal

    import ray

    def stop(signum, frame):
        raise KeyboardInterrupt

    own_ray = not ray.is_initialized() and not kwargs.get("address")
    url = start(bundle, **kwargs)
    print(f"serving {bundle} at {url}/predict (health: {url}/health); Ctrl-C stops", flush=True)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        if own_ray:
            ray.shutdown()
