"""Ray closed by default (tally.cluster): a local search's Ray listens on loopback only with token auth
on and usage stats off; joining a cluster without its token stops with one line."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tally.errors import TallyError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- listening sockets, read from /proc
def process_tree(root: int) -> set[int]:
    """root and all its descendants (a dead process simply drops out)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with_link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if with_link.startswith("socket:["):
                inodes.add(int(with_link[8:-1]))
    except OSError:
        pass
    return inodes


def _address(hex_address: str, v6: bool) -> str:
    raw = bytes.fromhex(hex_address.split(":")[0])
    if v6:  # four host-order 32-bit words
        raw = b"".join(struct.pack("<I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw)
    return socket.inet_ntoa(struct.pack("<I", int.from_bytes(raw, "big")))


def listening_sockets(pids: set[int]) -> set[tuple[str, str, int, str]]:
    """(protocol, address, port, process name) of every TCP socket listening and every UDP socket bound."""
    owner = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    found = set()
    for table, v6, state in (("tcp", False, "0A"), ("tcp6", True, "0A"), ("udp", False, "07"), ("udp6", True, "07")):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == state and int(fields[9]) in owner:
                try:
                    name = Path(f"/proc/{owner[int(fields[9])]}/cmdline").read_bytes().split(b"\0")
                    name = " ".join(part.decode(errors="replace") for part in name[:2])
                except OSError:
                    name = "?"
                found.add((table, _address(fields[1], v6), int(fields[1].split(":")[1], 16), name[:120]))
    return found


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1",) or address.startswith("::ffff:127.")


def environment(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def test_socket_reader_sees_this_process():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert ("tcp", "127.0.0.1", port) in {s[:3] for s in listening_sockets({os.getpid()})}


# ---------------------------------------------------------------- a real local search
SPEC = {
    "name": "closed", "base": {
        "data": {"source": "embedded", "setting": "sub", "image_size": 32},
        "model": {"arch": "resnet10", "cut": "layer2"}, "method": {"name": "tally"},
        "train": {"epochs": 2, "warmup_epochs": 1, "steps_per_epoch": 3, "batch_size": 16, "lr": 1e-3,
                  "device": "cpu"}},
    "space": {"method.alpha": {"type": "uniform", "low": 0.1, "high": 2.0}},
    "selection": {"metric": "pair_acc_mean"},
    "budget": {"trials": 1, "concurrency": 1}, "resources": {"workers": 1, "cpus_per_worker": 1}}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_local_search_listens_on_loopback_only_with_token_auth(tmp_path):
    """`tally search` on a local Ray: while the trial trains, every socket that Ray's processes (GCS,
    raylet, dashboard and its agents, workers) listen on is on 127.0.0.1; they run with token auth
    and without usage stats. torch.distributed's rendezvous store, opened by rank 0 of the trial's Train
    run (a data-parallel trial), is among them: torch binds it to all interfaces unless given a bound socket
    (tally.search.rendezvous).
    """
    spec = tmp_path / "spec.yaml"
    # two workers: a 1-worker trial trains in its own Tune actor, without Train or torch.distributed
    spec.write_text(yaml.safe_dump({**SPEC, "resources": {"workers": 2, "cpus_per_worker": 1}}))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["PYTHONPATH"] = str(ROOT)
    driver = subprocess.Popen([sys.executable, "-m", "tally.cli", "search", str(spec), "--storage",
                               str(tmp_path / "store")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)
    seen: set[tuple[str, str, int, str]] = set()
    ray_pids: set[int] = set()
    training = False
    while driver.poll() is None:  # sample until the search ends: Train's workers live only during the trial
        pids = process_tree(driver.pid)
        seen |= listening_sockets(pids)
        ray_pids |= pids - {driver.pid}
        training = training or any(b"ray::" in _cmdline(p) and b"Train" in _cmdline(p) for p in pids)
        envs = [environment(p) for p in pids if b"gcs_server" in _cmdline(p)]
        if envs:
            gcs_env = envs[0]
        time.sleep(0.5)
    output = driver.stdout.read()
    assert driver.returncode == 0, output[-3000:]
    assert training, "no Train process was seen: the sampling missed the trial"
    assert len(ray_pids) > 5 and len(seen) > 5, seen
    outside = sorted(s for s in seen if not is_loopback(s[1]))
    workers = sorted(s for s in seen if "RayTrainWorker" in s[3])
    print(f"\nlistening sockets of the search's Ray processes: {len(seen)}, outside loopback: {len(outside)}"
          f"; of the Train worker (torch's store among them): {workers}")
    assert outside == [], "\n".join(map(str, outside))
    # the dashboard's own process (port 8265 unless another Ray on the machine holds it)
    assert any("dashboard" in s[3] for s in seen), ("the dashboard (Train's State API) was not running", seen)
    assert gcs_env.get("RAY_AUTH_MODE") == "token"
    assert gcs_env.get("RAY_USAGE_STATS_ENABLED") == "0"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# ---------------------------------------------------------------- joining a cluster
def test_joining_a_cluster_without_its_token_is_one_line(tmp_path):
    """No RAY_AUTH_TOKEN, no token file: refused before Ray is asked, naming how to provide the token."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT))  # no ~/.ray/auth_token
    proc = subprocess.run([sys.executable, "-m", "tally.cli", "search", str(spec), "--address", "127.0.0.1:9",
                           "--storage", str(tmp_path / "store")], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "RAY_AUTH_TOKEN" in lines[0] and "127.0.0.1:9" in lines[0], proc.stderr
    assert not (tmp_path / "store" / "closed").exists()  # nothing half-written


def test_token_is_found_where_ray_reads_it(tmp_path, monkeypatch):
    from tally.cluster import token_available

    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not token_available()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("\n")
    assert not token_available()  # an empty file is no token
    (tmp_path / ".ray" / "auth_token").write_text("abc\n")
    assert token_available()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert not token_available()  # Ray reads only the named file then
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert token_available()


def test_token_auth_cannot_be_switched_off(monkeypatch):
    from tally import cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(TallyError, match="RAY_AUTH_MODE=disabled: the platform runs Ray only with token"):
        cluster.require_token_auth()
    monkeypatch.delenv("RAY_AUTH_MODE")
    cluster.require_token_auth()
    assert os.environ["RAY_AUTH_MODE"] == "token"


FRESH_START = """
from ray._raylet import AuthenticationMode, get_authentication_mode
assert get_authentication_mode() == AuthenticationMode.DISABLED  # Ray's config read (and cached) first
import ray
from tally.cluster import start_or_join
assert start_or_join(num_cpus=1)
assert get_authentication_mode() == AuthenticationMode.TOKEN
assert ray.get(ray.put(7)) == 7
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_process_that_touched_ray_first_still_starts_a_token_ray(tmp_path):
    """A fresh machine (no ~/.ray/auth_token) and a process whose Ray config was read before the platform
    asked for token auth (an import, an earlier test): the local Ray starts, makes its token, and the
    driver sends it (CI failed here: the cached "disabled" made no token and the GCS refused the driver)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", FRESH_START], capture_output=True, text=True, timeout=240,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (tmp_path / ".ray" / "auth_token").read_text().strip()
