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

    def stop(sig, frame):  # what Ctrl-C does, and what `tally train` installs for SIGTERM
        received.append(sig)
        raise KeyboardInterrupt(signal.Signals(sig).name)

    # our own handlers: an earlier test in the session (Ray Tune) may have left its own SIGINT handler
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        def write(f):
            f.write(b"first half, ")
            os.kill(os.getpid(), signum)  # the stop arrives mid-write (delivered at once, main thread)
            f.write(b"second half")

        with pytest.raises(KeyboardInterrupt):
            files.write_atomic(target, write)
        assert received == [signum]  # once, after the write
        assert all(signal.getsignal(s) is stop for s in previous)  # the handlers are back
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert target.read_bytes() == b"first half, second half"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left


def test_the_handlers_are_restored_when_the_write_fails(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def fail(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        files.write_atomic(tmp_path / "x", fail)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert list(tmp_path.iterdir()) == []
