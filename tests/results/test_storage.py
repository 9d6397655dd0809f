"""tally.results.storage against a real S3-compatible server (moto on 127.0.0.1): copies both ways, only what
changed, status.json last, the bucket wins on pull, a killed writer publishes nothing, the lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tally import results
from tally.errors import TallyError
from tally.results import storage
from tests.s3_server import s3_server
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def bucket():
    with s3_server() as uri:
        yield uri


@pytest.fixture
def prefix(bucket, request, tmp_path, monkeypatch):
    """A fresh prefix per test, and staging folders under the test's tmp_path."""
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    return storage.join(bucket, request.node.name.replace("[", "-").replace("]", ""))


def _objects(uri: str) -> dict[str, bytes]:
    fs, base = storage.filesystem(uri)
    out = {}
    for rel in storage._listing(fs, base):
        with fs.open_input_stream(f"{base}/{rel}") as f:
            out[rel] = f.read()
    return out


def _put(uri: str, data: bytes) -> None:
    fs, path = storage.filesystem(uri)
    with fs.open_output_stream(path) as out:
        out.write(data)


def _fill(folder: Path) -> None:
    results.write_yaml(folder / "config.yaml", {"a": 1})
    results.write_status(folder / "trials" / "t1", "running", epoch=0)
    results.append_jsonl(folder / "trials" / "t1" / "epochs.jsonl", {"epoch": 0})
    (folder / "trials" / "t1" / "checkpoints").mkdir()
    (folder / "trials" / "t1" / "checkpoints" / "last.pt").write_bytes(b"weights" * 1000)


def test_locations_and_names(tmp_path, monkeypatch):
    assert storage.is_remote("s3://b/p") and storage.is_remote("gs://b")
    assert not storage.is_remote("results") and not storage.is_remote(tmp_path)
    assert not storage.is_remote("file:///tmp/x") and not storage.is_remote(None)
    assert storage.join("s3://b/p/", "exp", "trials/t1") == "s3://b/p/exp/trials/t1"
    for bad in ("../x", "a//b", "", "a/./b"):
        with pytest.raises(TallyError, match="not a valid name"):
            storage.join("s3://b/p", bad)
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "st"))
    local = storage.stage("s3://b/p/exp", "driver")
    assert local == tmp_path / "st" / "driver" / "s3" / "b" / "p" / "exp"
    assert storage.remote_of(local) == "s3://b/p/exp" and storage.remote_of(tmp_path) is None
    assert storage.ray_path(local) == "s3://b/p/exp/ray" and storage.ray_path(tmp_path) == str(tmp_path / "ray")
    assert storage.experiment_dir(tmp_path, "x") == (tmp_path / "x").resolve()  # POSIX: unchanged
    with pytest.raises(TallyError):
        storage.experiment_dir("s3://b/p", "../x")
    with pytest.raises(TallyError, match="expected scheme://bucket/prefix"):
        storage.experiment_dir("s3://", "x")
    # an ordinary folder: push and pull do nothing
    assert storage.push(tmp_path) == [] and storage.pull(tmp_path) == []


def test_push_sends_status_last_and_only_what_changed(prefix):
    local = storage.stage(prefix, "driver")
    _fill(local)
    (local / "trials" / "t1" / "checkpoints" / "best.pt").write_bytes(b"best")
    sent = storage.push(local)
    # the order training commits them: records, best.pt, last.pt (the resume point), status.json
    assert sent[-3:] == ["trials/t1/checkpoints/best.pt", "trials/t1/checkpoints/last.pt", "trials/t1/status.json"]
    assert set(sent) == {"config.yaml", "trials/t1/status.json", "trials/t1/epochs.jsonl",
                         "trials/t1/checkpoints/last.pt", "trials/t1/checkpoints/best.pt"}  # dot-files (.remote, .sync-state) stay local
    assert _objects(prefix)["trials/t1/checkpoints/last.pt"] == b"weights" * 1000
    assert storage.push(local) == []  # nothing changed
    results.append_jsonl(local / "trials" / "t1" / "epochs.jsonl", {"epoch": 1})
    results.write_status(local / "trials" / "t1", "running", epoch=1)
    assert storage.push(local) == ["trials/t1/epochs.jsonl", "trials/t1/status.json"]
    assert json.loads(_objects(prefix)["trials/t1/status.json"])["epoch"] == 1


def test_pull_mirrors_the_bucket_and_skips_what_is_unchanged(prefix, monkeypatch):
    writer = storage.stage(prefix, "driver")
    _fill(writer)
    storage.push(writer)
    reader = storage.stage(prefix, "read")
    got = storage.pull(reader)
    assert set(got) == {"config.yaml", "trials/t1/status.json", "trials/t1/epochs.jsonl"}  # no checkpoints
    assert not (reader / "trials" / "t1" / "checkpoints").exists()
    assert results.read_run(reader / "trials" / "t1").status["epoch"] == 0
    monkeypatch.setattr(storage, "SETTLE_S", -1e9)  # pretend the copies are old enough to trust
    assert storage.pull(reader) == []
    # the bucket wins: a changed object replaces the local file, a local edit is undone, a removed one goes
    results.write_status(writer / "trials" / "t1", "done")
    storage.push(writer)
    (reader / "config.yaml").write_text("edited locally\n")
    (reader / "trials" / "t1" / "stray.json").write_text("{}")
    fs, base = storage.filesystem(prefix)
    fs.delete_file(f"{base}/trials/t1/epochs.jsonl")
    got = storage.pull(reader)
    assert set(got) == {"trials/t1/status.json", "config.yaml", "trials/t1/epochs.jsonl",
                        "trials/t1/stray.json"}
    assert results.read_yaml(reader / "config.yaml") == {"a": 1}
    assert results.read_run(reader / "trials" / "t1").state == "done"
    assert not (reader / "trials" / "t1" / "epochs.jsonl").exists()
    assert not (reader / "trials" / "t1" / "stray.json").exists()
    # a subfolder with its checkpoints (what `tally export` fetches)
    storage.fetch_run(reader / "trials" / "t1")
    assert (reader / "trials" / "t1" / "checkpoints" / "last.pt").read_bytes() == b"weights" * 1000


def test_a_change_within_the_same_second_is_not_missed(prefix):
    """Object timestamps have 1 s resolution: two same-size writes in one second look alike."""
    reader = storage.stage(prefix, "read")
    _put(storage.join(prefix, "status.json"), b'{"epoch": 1}')
    storage.pull(reader)
    _put(storage.join(prefix, "status.json"), b'{"epoch": 2}')
    storage.pull(reader)
    assert results.read_json(reader / "status.json") == {"epoch": 2}


def test_read_mirror_refreshes_at_most_every_max_age(prefix):
    _put(storage.join(prefix, "exp", "spec.yaml"), b"name: one\n")
    local = storage.read_mirror(prefix, max_age_s=3600)
    assert results.read_yaml(local / "exp" / "spec.yaml") == {"name": "one"}
    _put(storage.join(prefix, "exp", "spec.yaml"), b"name: two\n")
    assert results.read_yaml(storage.read_mirror(prefix, max_age_s=3600) / "exp" / "spec.yaml") == {"name": "one"}
    assert results.read_yaml(storage.read_mirror(prefix, max_age_s=0) / "exp" / "spec.yaml") == {"name": "two"}
    assert storage.read_mirror("results") == Path("results")


def test_a_writer_killed_mid_upload_publishes_nothing(prefix):
    """The publish step is the end of the upload: a writer that dies with 12 MiB sent (a multipart
    part already uploaded) leaves the old object, whole."""
    uri = storage.join(prefix, "checkpoints", "last.pt")
    _put(uri, b"old")
    script = (f"import os; from tally.results import storage; fs, path = storage.filesystem({uri!r}); "
              "out = fs.open_output_stream(path); out.write(b'x' * (12 * 2**20)); out.flush(); os._exit(9)")
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(Path.cwd())},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert _objects(prefix)["checkpoints/last.pt"] == b"old"


def test_storage_errors_are_one_line(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path))
    local = storage.stage("s3://no-such-bucket-here/x", "read")
    with pytest.raises(TallyError, match="s3://no-such-bucket-here/x"):
        results.write_text(local / "a.txt", "a")
        storage.push(local)


@pytest.mark.parametrize("conditional", [True, False], ids=["conditional-write", "best-effort"])
def test_the_experiment_lock(prefix, monkeypatch, conditional):
    if not conditional:
        monkeypatch.setattr(storage, "_s3_client", lambda: None)
    exp = storage.stage(prefix, "driver")
    with storage.exclusive(exp, "experiment"):
        holder = json.loads(_objects(prefix)[".lock"])
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(TallyError, match=rf"in use by host {socket.gethostname()} pid {os.getpid()}"), \
                storage.exclusive(exp, "experiment"):
            pass
    assert ".lock" not in _objects(prefix)  # released
    # a holder that is gone: a dead pid on this host, or no renewal for LEASE_S on another host
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [{"host": socket.gethostname(), "pid": int(dead), "renewed": time.time()},
             {"host": "elsewhere", "pid": 1, "renewed": time.time() - storage.LEASE_S - 1}]
    for holder in stale:
        _put(storage.join(prefix, ".lock"), json.dumps(holder).encode())
        with storage.exclusive(exp, "experiment"):
            assert json.loads(_objects(prefix)[".lock"])["pid"] == os.getpid()
    _put(storage.join(prefix, ".lock"), json.dumps({"host": "elsewhere", "pid": 7, "renewed": time.time(),
                                                    "started": time.time()}).encode())
    with pytest.raises(TallyError, match="in use by host elsewhere pid 7"), storage.exclusive(exp, "experiment"):
        pass


def test_a_heartbeat_in_the_bucket_keeps_a_long_epoch_running(prefix, monkeypatch):
    """Readers on other hosts judge a running run by its heartbeat's time; the mirror keeps that time."""
    writer, reader = storage.stage(prefix, "rank0"), storage.stage(prefix, "read")
    results.write_json(writer / "status.json", {"status": "running", "owner": {"host": "elsewhere", "pid": 1},
                                                "updated": time.time() - 10 * results.LOST_AFTER_S})
    storage.push(writer)
    storage.pull(reader)
    assert results.run_state(reader, results.read_json(reader / "status.json")) == "lost"  # no sign of life
    monkeypatch.setattr(results, "HEARTBEAT_S", 0.2)
    fs, base = storage.filesystem(prefix)
    with storage.heartbeat(writer):
        wait_for(lambda: fs.get_file_info(f"{base}/{results.HEARTBEAT}").is_file, timeout=60,
                 what="the heartbeat in the bucket")
    storage.pull(reader)
    beat = (reader / results.HEARTBEAT).stat().st_mtime
    assert beat == fs.get_file_info(f"{base}/{results.HEARTBEAT}").mtime.timestamp()  # the bucket's time
    assert results.run_state(reader, results.read_json(reader / "status.json")) == "running"


def test_a_stray_remote_file_never_makes_a_local_store_a_mirror(bucket, tmp_path, monkeypatch):
    """`tally export` of a local store with a .remote in a parent folder: nothing is pulled, nothing deleted."""
    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    uri = storage.join(bucket, "stray")  # an empty prefix: a pull would delete every local file
    store = tmp_path / "store"
    run = store / "exp" / "trials" / "t1"
    _fill(store / "exp")
    for planted in (tmp_path, store, store / "exp"):
        (planted / storage.REMOTE_FILE).write_text(uri + "\n")
    storage.fetch_run(run)
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "status.json").is_file()
    assert storage.remote_of(store) is None and storage.pull(store) == [] and storage.push(store) == []
    # only the folder stage() made counts, and only for the URI its path spells
    local = storage.stage(uri, "read")
    assert storage.remote_of(local) == uri
    (local / storage.REMOTE_FILE).write_text(storage.join(bucket, "other") + "\n")
    assert storage.remote_of(local) is None


def test_credentials_in_a_store_uri_are_refused_and_never_written(tmp_path, monkeypatch, capsys):
    from tally.cli import main

    monkeypatch.setenv(storage.STAGING_ENV, str(tmp_path / "staging"))
    uri = "s3://AKIAKEY:TOPSECRET@bucket/prefix"
    for call in (lambda: storage.is_remote(uri), lambda: storage.stage(uri, "read"),
                 lambda: storage.experiment_dir(uri, "exp"), lambda: storage.read_mirror(uri)):
        with pytest.raises(TallyError, match="credentials in a store URI are refused") as err:
            call()
        assert "TOPSECRET" not in str(err.value) and "AWS_SECRET_ACCESS_KEY" in str(err.value)
    assert main(["report", uri]) == 2
    err = capsys.readouterr().err
    assert "TOPSECRET" not in err and err.count("\n") == 1
    found = [str(p) for p in tmp_path.rglob("*")]
    assert not [p for p in found if "TOPSECRET" in p], found
