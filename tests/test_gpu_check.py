"""bench/gpu_check.sh, the device check of the CUDA path, runs on the CPU with a tiny budget: every
stage's code path stays tested where no GPU is lent (a GPU session runs it with --device cuda)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bad_arguments_are_refused_with_one_line():
    proc = _run("--device", "tpu")
    assert proc.returncode == 2 and proc.stderr.strip() == "gpu_check.sh: --device: expected cuda or cpu, got tpu"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_device_check_runs_on_the_cpu_with_a_tiny_budget(tmp_path):
    out = tmp_path / "check"
    proc = _run("--device", "cpu", "--budget", "tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for stage in ("== 1. training's step, eager", "== 2. tally train", "== 3. resume", "== 4. compiled", "== summary"):
        assert stage in text
    # the bench timed training's step for ERM and both TALLY stem passes
    for runner in ("erm", "stem", "tally", "tally-joint"):
        assert any(line.split()[2:4] == [runner, "eager"] for line in text.splitlines() if "32px" in line), runner
    assert "tally eager step / (ERM step + stem pass): median" in text  # TALLY against its time floor too
    assert "compiled r10-32 tally: skipped" in text  # no compile budget unless asked
    # the run resumed from its CPU checkpoint ends where the straight run ends (on the CPU, exactly)
    straight = json.loads((out / "run" / "metrics.json").read_text())
    resumed = json.loads((out / "resumed" / "metrics.json").read_text())
    assert set(straight) == {"val", "test_sub"} and resumed == straight
    finals = [line for line in text.splitlines() if line.startswith("final metrics (")]
    assert len(finals) == 2 and all("val: pair_acc_mean" in line for line in finals)
    # every stage ran with the cluster packages unimportable, as on the GPU machine
    blocked = subprocess.run([sys.executable, str(out / "driver.py"), "-m", "ray"], capture_output=True, text=True,
                             cwd=ROOT)
    assert blocked.returncode != 0 and "not on the GPU machine" in blocked.stderr
