"""`tally serve` on loopback: real HTTP requests to a Ray Serve deployment of a tiny bundle.

One Ray (and one Serve application) for the whole module, shut down at the end: starting Ray costs
seconds of CPU on a small machine. The decoder and limits are also tested without Ray.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from tally.data import load_splits
from tally.data.dataset import read_image
from tally.deploy.export import Predictor, export_bundle
from tests.bundle_factory import TINY_CONFIG, tiny_run

MAX_BYTES = 300_000
MAX_PIXELS = 1_000_000
BODY_TIMEOUT_S = 10
MAX_ONGOING = 8
MAX_QUEUED = 8  # Ray's router sees a replica's load with a lag: a queue of 1 drops some of 8 clients


def _png(width: int, height: int, colour=(200, 30, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- without Ray
def test_decoder_checks_the_header_before_decoding():
    from tally.deploy.serve import BadRequest, decode_image_bytes

    image = decode_image_bytes(_png(7, 5), MAX_PIXELS)
    assert image.shape == (3, 5, 7) and image.dtype == torch.uint8
    assert image[:, 0, 0].tolist() == [200, 30, 90]
    big = _png(2000, 1000)  # a few kB that would decode to 6 MB
    assert len(big) < 50_000
    with pytest.raises(BadRequest, match="2000x1000 = 2000000 pixels") as e:
        decode_image_bytes(big, MAX_PIXELS)
    assert e.value.status == 413
    with pytest.raises(BadRequest, match="not an image") as e:
        decode_image_bytes(b"GIF? no, just text", MAX_PIXELS)
    assert e.value.status == 415
    with pytest.raises(BadRequest) as e:  # a valid header over truncated data
        decode_image_bytes(_png(64, 64)[:60], MAX_PIXELS)
    assert 400 <= e.value.status < 500


def _request(body: bytes, content_type: str, chunks: int = 1, stall: bool = False):
    """A starlette Request whose body arrives in ``chunks`` pieces; ``stall``: then nothing more, ever."""
    from starlette.requests import Request

    size = -(-len(body) // chunks) if body else 1
    pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    state = {"sent": 0}

    async def receive():
        import asyncio

        if state["sent"] == len(pieces):
            await asyncio.Event().wait()  # a client that stopped sending
        state["sent"] += 1
        return {"type": "http.request", "body": pieces[state["sent"] - 1],
                "more_body": stall or state["sent"] < len(pieces)}

    headers = [(b"content-type", content_type.encode())]
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers,
                    "query_string": b""}, receive)


def _images(body: bytes, content_type: str, chunks: int = 1, stall: bool = False, body_timeout_s: float = 20.0):
    """_images_in on an in-process request, bounded: a test that would hang fails instead."""
    import asyncio

    from tally.deploy.serve import _images_in

    request = _request(body, content_type, chunks, stall)
    return asyncio.run(asyncio.wait_for(_images_in(request, MAX_BYTES, body_timeout_s), timeout=30))


def test_json_that_nests_deep_or_holds_huge_numbers_is_a_400_and_the_count_comes_first():
    from tally.deploy.serve import MAX_IMAGES_PER_REQUEST, BadRequest

    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"images": ' + b"9" * 5000 + b"}",
                 b'{"image": {"a": ' * 3000 + b"1" + b"}" * 3000):
        with pytest.raises(BadRequest, match="not valid JSON") as e:
            _images(body, "application/json")
        assert e.value.status == 400
    # 65 items refused on their count, before any is base64-decoded (these are not base64 at all)
    body = json.dumps({"images": ["@@@"] * (MAX_IMAGES_PER_REQUEST + 1)}).encode()
    with pytest.raises(BadRequest, match=f"{MAX_IMAGES_PER_REQUEST + 1} images in one request") as e:
        _images(body, "application/json")
    assert e.value.status == 413


def test_multipart_temporary_files_are_always_closed(monkeypatch):
    from starlette.datastructures import UploadFile

    from tally.deploy.serve import BadRequest

    opened, closed = [], []
    real_init, real_close = UploadFile.__init__, UploadFile.close

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self)

    async def close(self):
        closed.append(self)
        await real_close(self)

    monkeypatch.setattr(UploadFile, "__init__", init)
    monkeypatch.setattr(UploadFile, "close", close)
    body, kind = multipart([("a.png", _png(3, 3)), ("b.png", _png(4, 4))])
    assert [len(x) for x in _images(body, kind)] == [len(_png(3, 3)), len(_png(4, 4))]
    boundary = kind.split("=")[1]  # a form of one text field and no file: refused, still closed after
    with pytest.raises(BadRequest, match="holds no file"):
        _images(f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--{boundary}--\r\n"
                .encode(), kind)
    assert len(opened) == 2 and all(f.file.closed for f in opened) and set(map(id, closed)) == set(map(id, opened))


def test_a_body_not_received_in_time_is_a_408():
    from tally.deploy.serve import BadRequest

    with pytest.raises(BadRequest, match="request body not received within 0.5 s") as e:
        _images(_png(8, 8), "image/png", chunks=2, stall=True, body_timeout_s=0.5)
    assert e.value.status == 408
    assert _images(_png(8, 8), "image/png", chunks=3, body_timeout_s=5) == [_png(8, 8)]


def test_the_pixel_budget_of_a_request_is_checked_from_headers_before_decoding():
    from tally.deploy.serve import BadRequest, check_pixels

    images = [_png(600, 600), _png(600, 600), _png(300, 300)]  # 810 000 pixels together
    check_pixels(images, MAX_PIXELS, 810_000)
    with pytest.raises(BadRequest, match="3 images hold 810000 pixels together; the limit is 800000") as e:
        check_pixels(images, MAX_PIXELS, 800_000)
    assert e.value.status == 413
    with pytest.raises(BadRequest, match="image 2: not an image") as e:
        check_pixels([_png(2, 2), b"text"], MAX_PIXELS, 800_000)
    assert e.value.status == 415


def test_a_request_over_its_deadline_answers_503_and_is_counted():
    import asyncio

    from tally.deploy.serve import BundleServer

    server = object.__new__(BundleServer.func_or_class)  # the replica's logic without Ray or a model
    server.request_timeout_s, server.stats = 0.2, {"bad_requests": 0}

    async def slow(request):
        await asyncio.sleep(60)

    server._predict = slow
    response = asyncio.run(asyncio.wait_for(server(_request(b"x", "image/png")), timeout=30))
    assert response.status_code == 503 and b"not answered within 0.2 s" in response.body
    assert server.stats["bad_requests"] == 1


def test_serve_flags_default_to_the_servers_limits():
    from tally.cli import build_parser
    from tally.deploy import serve

    args = build_parser().parse_args(["serve", "bundle"])
    assert (args.max_bytes, args.max_pixels, args.max_request_pixels, args.body_timeout, args.request_timeout,
            args.decoders, args.max_ongoing, args.max_queued) == (
        serve.DEFAULT_MAX_BYTES, serve.DEFAULT_MAX_PIXELS, serve.DEFAULT_MAX_REQUEST_PIXELS,
        serve.DEFAULT_BODY_TIMEOUT_S, serve.DEFAULT_REQUEST_TIMEOUT_S, serve.DEFAULT_DECODERS,
        serve.DEFAULT_MAX_ONGOING, serve.DEFAULT_MAX_QUEUED)


# ---------------------------------------------------------------- on Ray Serve
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    return export_bundle(tiny_run(tmp / "run"), tmp / "bundle")


@pytest.fixture(scope="module")
def server(bundle, local_ray):
    """The deployment on 127.0.0.1 at a free port, on the session's one local Ray; Serve stopped after
    (Ray stays up for the other modules: one Ray per test session)."""
    from ray import serve

    from tally.deploy.serve import start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start(bundle, host="127.0.0.1", port=port, cpus=0.5, top_k=3, max_batch_size=8,
                batch_wait_timeout_s=0.05, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS,
                body_timeout_s=BODY_TIMEOUT_S, max_ongoing=MAX_ONGOING, max_queued=MAX_QUEUED)
    try:
        yield url
    finally:
        serve.shutdown()


def request(url: str, data: bytes | None = None, content_type: str = "application/octet-stream"):
    """(status, JSON body) of one HTTP request; 4xx/5xx included."""
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        text = e.read()
        try:
            return e.code, json.loads(text)
        except ValueError:  # Ray's proxy answers some refusals (a full queue) in plain text
            return e.code, {"error": text.decode(errors="replace")}


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def images(bundle):
    """Real test images (encoded bytes) and the in-process model's probabilities for each."""
    paths = load_splits(TINY_CONFIG["data"])["test_sub"].paths[:24]
    predictor = Predictor(bundle)
    probs = predictor.probabilities(torch.stack([predictor.prepare(read_image(p)) for p in paths]))
    return [Path(p).read_bytes() for p in paths], probs, predictor


def check(answer: dict, expected: torch.Tensor, predictor: Predictor) -> None:
    got = torch.tensor([answer["probabilities"][c] for c in predictor.classes])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert answer["label"] == predictor.classes[int(got.argmax())]
    assert answer["confidence"] == pytest.approx(float(got.max()))
    assert [t["label"] for t in answer["top_k"]] == [predictor.classes[i] for i in got.topk(3).indices]


@pytest.mark.slow
def test_serve_answers_batches_concurrent_clients_and_bad_requests(server, images):
    encoded, expected, predictor = images
    status, health = request(f"{server}/health")
    assert status == 200 and health["status"] == "ok" and health["bundle"] == predictor.bundle_id
    assert health["classes"] == list(predictor.classes) and health["limits"]["max_pixels"] == MAX_PIXELS

    # one image, three ways: raw bytes, base64 JSON, multipart
    status, body = request(f"{server}/predict", encoded[0], "image/png")
    assert status == 200 and body["bundle"] == predictor.bundle_id and len(body["predictions"]) == 1
    check(body["predictions"][0], expected[0], predictor)
    payload = json.dumps({"image": base64.b64encode(encoded[1]).decode()}).encode()
    status, body = request(f"{server}/predict", payload, "application/json")
    assert status == 200
    check(body["predictions"][0], expected[1], predictor)
    status, body = request(f"{server}/predict", *multipart([("a.png", encoded[2]), ("b.png", encoded[3])]))
    assert status == 200 and len(body["predictions"]) == 2
    for answer, probs in zip(body["predictions"], expected[2:4], strict=True):
        check(answer, probs, predictor)

    # a batch of images in one request shares forward passes (serve.batch)
    payload = json.dumps({"images": [base64.b64encode(e).decode() for e in encoded[:8]]}).encode()
    status, body = request(f"{server}/predict", payload, "application/json")
    assert status == 200 and len(body["predictions"]) == 8
    for answer, probs in zip(body["predictions"], expected[:8], strict=True):
        check(answer, probs, predictor)
    assert request(f"{server}/stats")[1]["served"]["largest_batch"] > 1

    # 8 concurrent clients, 24 requests
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda e: request(f"{server}/predict", e, "image/png"), encoded))
    for (status, body), probs in zip(answers, expected, strict=True):
        assert status == 200
        check(body["predictions"][0], probs, predictor)

    # bad requests: a 4xx with a one-line reason each
    bad = [
        (b"this is not an image", "image/png", 415, "not an image"),
        (bytes(MAX_BYTES + 1), "application/octet-stream", 413, "limit"),
        (_png(2000, 1000), "image/png", 413, "pixels"),
        (b"{not json", "application/json", 400, "JSON"),
        (b'{"image": "@@@"}', "application/json", 400, "base64"),
        (b"", "image/png", 400, "empty"),
    ]
    for data, kind, code, reason in bad:
        status, body = request(f"{server}/predict", data, kind)
        assert status == code and reason in body["error"] and "\n" not in body["error"], (code, body)
    assert request(f"{server}/nowhere")[0] == 404
    assert request(f"{server}/predict")[0] == 405

    # and it keeps serving
    status, body = request(f"{server}/predict", encoded[5], "image/png")
    assert status == 200
    check(body["predictions"][0], expected[5], predictor)
    assert request(f"{server}/stats")[1]["served"]["bad_requests"] == len(bad)


def slow_upload(url: str) -> socket.socket:
    """A client that sends the headers and 4 bytes of a 1000-byte body, then nothing."""
    host, port = url.removeprefix("http://").split(":")
    client = socket.create_connection((host, int(port)))
    client.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
                   b"Content-Length: 1000\r\n\r\n\x89PNG")
    return client


@pytest.mark.slow
def test_slow_uploads_fill_the_queue_not_health_and_are_dropped_at_the_body_deadline(server, images):
    import select
    import time

    encoded, expected, predictor = images
    # every slot of the replica and the queue. Ray's router sees the replica's load with a lag, so it may
    # refuse some uploads (503) while the queue still has room: replace those until every held upload
    # stays held (the bound itself is checked below: the next request must still be refused)
    held: list[socket.socket] = []
    try:
        for _ in range(4):  # within the first uploads' body deadline (BODY_TIMEOUT_S)
            held += [slow_upload(server) for _ in range(MAX_ONGOING + MAX_QUEUED - len(held))]
            time.sleep(1.5)  # the proxy hands each to the replica (or the queue) as soon as its headers are in
            refused = select.select(held, [], [], 0)[0]
            for client in refused:
                assert b" 503 " in client.recv(4096).split(b"\r\n")[0]
                client.close()
            held = [c for c in held if c not in refused]
            if not refused:
                break
        assert len(held) == MAX_ONGOING + MAX_QUEUED
        req = urllib.request.Request(f"{server}/predict", data=encoded[0], headers={"Content-Type": "image/png"})
        with pytest.raises(urllib.error.HTTPError) as e:  # the queue is full: refused at once, not queued
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 503
        status, health = request(f"{server}/health")  # from its own deployment: not behind the uploads
        assert status == 200 and health["bundle"] == predictor.bundle_id
        assert not select.select(held, [], [], 0)[0], "an upload was answered before /health: nothing was held"
        for client in held:  # each is dropped when its body deadline passes (the queued one after a slot frees)
            client.settimeout(4 * BODY_TIMEOUT_S + 60)
            first_line = client.recv(4096).split(b"\r\n")[0]
            assert b" 408 " in first_line, first_line
    finally:
        for client in held:
            client.close()
    status, body = request(f"{server}/predict", encoded[1], "image/png")  # and it serves again
    assert status == 200
    check(body["predictions"][0], expected[1], predictor)


@pytest.mark.slow
def test_serve_refuses_a_changed_bundle_before_starting_ray(bundle, tmp_path, capsys):
    import shutil

    import ray

    from tally.cli import main

    copy = Path(shutil.copytree(bundle, tmp_path / "copy"))
    (copy / "labels.json").write_text('{"classes": [], "domains": []}')
    was_running = ray.is_initialized()
    assert main(["serve", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "labels.json" in err and err.count("\n") == 0
    assert ray.is_initialized() == was_running


def test_serve_binds_loopback_unless_told():
    from tally.cli import build_parser

    args = build_parser().parse_args(["serve", "bundle"])
    assert args.host == "127.0.0.1" and args.replicas == 1 and args.gpus == 0
    assert build_parser().parse_args(["serve", "bundle", "--host", "0.0.0.0", "--gpus", "0.5"]).gpus == 0.5
