"""`tally serve BUNDLE`: a bundle behind HTTP on Ray Serve, with request batching.

Routes
- GET  /health  -> {"status": "ok", "bundle": id, "classes": [...], "served": {...}}
- POST /predict -> {"bundle": id, "predictions": [{"label", "confidence", "top_k", "probabilities"}]}
  The body is one image as raw bytes (any image/* or application/octet-stream content type), a
  multipart form with one or more files, or JSON {"image": "<base64>"} / {"images": [...]}.

Every image of every request goes through one ``serve.batch`` method, so concurrent requests share
forward passes. Bad input gets a 4xx with a one-line {"error": ...} and the replica keeps serving:
a body over ``max_bytes`` is refused before it is read in full, and an image whose header declares
more than ``max_pixels`` is refused before it is decoded (a small PNG can expand to gigabytes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
import warnings
from pathlib import Path

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from tally.errors import TallyError

DEFAULT_MAX_BYTES = 16 * 2**20
DEFAULT_MAX_PIXELS = 40_000_000  # about 8000 x 5000
MAX_IMAGES_PER_REQUEST = 64


class BadRequest(Exception):
    """A client error: HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def decode_image_bytes(data: bytes, max_pixels: int) -> torch.Tensor:
    """uint8 (3, H, W) RGB from encoded bytes; the size is checked from the header before decoding.

    Decoders as the data layer's read_image: torchvision's first, PIL for what it cannot read.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:  # parses the header only
            width, height = im.size
    except Image.DecompressionBombError:
        raise BadRequest(413, f"image has too many pixels (limit {max_pixels})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadRequest(415, "not an image (no known image format in the body)") from None
    if width * height > max_pixels:
        raise BadRequest(413, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    import torchvision.io as tio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision >= 0.29 warns that its decoders are deprecated
            image = tio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                     mode=tio.ImageReadMode.RGB)
        if image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
            return image
    except Exception:  # any torchvision decoder failure falls through to PIL
        pass
    try:
        import numpy as np

        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadRequest(400, f"cannot decode the image: {type(e).__name__}") from None
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(413, f"request body is {int(declared)} bytes; the limit is {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BadRequest(413, f"request body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _images_in(request: Request, max_bytes: int) -> list[bytes]:
    """The encoded images of a request body, by content type."""
    body = await _read_body(request, max_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest(400, "body is not valid JSON") from None
        items = payload.get("images", [payload.get("image")]) if isinstance(payload, dict) else None
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise BadRequest(400, 'JSON body must be {"image": "<base64>"} or {"images": ["<base64>", ...]}')
        try:
            return [base64.b64decode(item, validate=True) for item in items]
        except (binascii.Error, ValueError):
            raise BadRequest(400, "an image is not valid base64") from None
    if kind == "multipart/form-data":
        async def replay():  # the body was already read (size-checked): hand it to the form parser
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=MAX_IMAGES_PER_REQUEST,
                                                             max_part_size=max_bytes)
        except Exception as e:  # starlette's parser errors on malformed forms
            raise BadRequest(400, f"malformed multipart body: {str(e).splitlines()[0] if str(e) else e}") from None
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise BadRequest(400, "multipart body holds no file")
        return [await f.read() for f in files]
    if not body:
        raise BadRequest(400, "empty body: send an image")
    return [body]


@serve.deployment
class BundleServer:
    """One replica: a verified bundle's network; images of concurrent requests share forward passes."""

    def __init__(self, bundle: str, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
                 top_k: int = 5, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005):
        from tally.deploy.export import Predictor

        self.predictor = Predictor(bundle, device="auto")  # a replica without GPUs sees none
        self.max_bytes, self.max_pixels = int(max_bytes), int(max_pixels)
        self.top_k = max(1, min(int(top_k), len(self.predictor.classes)))
        self.classes = [str(c) for c in self.predictor.classes]
        self.classify.set_max_batch_size(max_batch_size)
        self.classify.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.stats = {"images": 0, "batches": 0, "largest_batch": 0, "bad_requests": 0}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def classify(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
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

    def _prepare(self, data: bytes) -> torch.Tensor:
        return self.predictor.prepare(decode_image_bytes(data, self.max_pixels))

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/") or "/"
        if path == "/health":
            return JSONResponse({"status": "ok", "bundle": self.predictor.bundle_id, "classes": self.classes,
                                 "device": str(self.predictor.device), "served": self.stats})
        if path != "/predict":
            return JSONResponse({"error": f"no route {path}: POST /predict or GET /health"}, status_code=404)
        if request.method != "POST":
            return JSONResponse({"error": "POST an image to /predict"}, status_code=405)
        try:
            encoded = await _images_in(request, self.max_bytes)
            if len(encoded) > MAX_IMAGES_PER_REQUEST:
                raise BadRequest(413, f"{len(encoded)} images in one request; the limit is {MAX_IMAGES_PER_REQUEST}")
            # decoding runs in threads: the event loop keeps accepting requests meanwhile
            images = await asyncio.gather(*(asyncio.to_thread(self._prepare, data) for data in encoded))
        except BadRequest as e:
            self.stats["bad_requests"] += 1
            return JSONResponse({"error": e.reason}, status_code=e.status)
        probs = await asyncio.gather(*(self.classify(image) for image in images))
        return JSONResponse({"bundle": self.predictor.bundle_id, "predictions": [self._answer(p) for p in probs]})


def build_app(bundle: str | Path, replicas: int = 1, gpus: float = 0.0, cpus: float = 1.0, **options):
    """The Serve application of one bundle (``options`` go to BundleServer)."""
    if replicas < 1:
        raise TallyError(f"--replicas: expected an integer >= 1, got {replicas}")
    if gpus < 0 or cpus < 0:
        raise TallyError(f"--gpus/--cpus: expected numbers >= 0, got {gpus}/{cpus}")
    return BundleServer.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus, "num_gpus": gpus}
                                ).bind(str(Path(bundle).resolve()), **options)


def start(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          replicas: int = 1, gpus: float = 0.0, cpus: float = 1.0, **options) -> str:
    """Verify the bundle, start (or join) Ray and Serve, deploy; returns the base URL. Does not block."""
    from tally.cluster import start_or_join
    from tally.deploy.export import verify_bundle

    verify_bundle(bundle)  # a bad bundle fails here, in one line, before Ray starts
    app = build_app(bundle, replicas=replicas, gpus=gpus, cpus=cpus, **options)
    start_or_join(address)  # loopback and Ray's token auth for a local Ray; a cluster's token required
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(app, name="tally", route_prefix="/", blocking=False)
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
