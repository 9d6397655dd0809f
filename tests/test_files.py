"""tally.files: a stop that arrives during an atomic write waits for the write."""

import os
import signal

import pytest

from tally import files


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_an_atomic_write_takes_effect_once_the_file_is_whole(tmp_path, signum):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    received = []

    def on_term(sig, frame):  # what `tally train` installs for SIGTERM: a stop like Ctrl-C
        received.append(sig)
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        def write(f):
            f.write(b"first half, ")
            os.kill(os.getpid(), signum)  # the stop arrives mid-write (delivered at once, main thread)
            f.write(b"second half")

        with pytest.raises(KeyboardInterrupt):
            files.write_atomic(target, write)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert target.read_bytes() == b"first half, second half"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left
    assert received == ([signal.SIGTERM] if signum == signal.SIGTERM else [])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are back


def test_the_handlers_are_restored_when_the_write_fails(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def fail(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        files.write_atomic(tmp_path / "x", fail)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert list(tmp_path.iterdir()) == []
