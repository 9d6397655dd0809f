#!/usr/bin/env bash
# The device check of the CUDA path (issue 17), in under 5 minutes on one GPU:
#   1. bench/train_step.py, eager: ResNet-18 at 64 px and ResNet-50 at 224 px, ERM, the stem pass and TALLY
#      (both stem passes): img/s, GPU memory peak, host syncs per step;
#   2. `python3 -m tally.cli train`: 3 short epochs of ResNet-50 on the embedded data, bf16, final metrics;
#   3. a resume: the same run's first epoch on the CPU, then `tally train --resume` on the device (a CPU
#      checkpoint resumed on the GPU), final metrics side by side with step 2;
#   4. bench/train_step.py, compiled (torch.compile; CUDA graphs, "reduce-overhead", on CUDA) against eager,
#      most informative first, while the time budget (--compile-seconds) lasts.
# Every Python step runs with Ray, Optuna and Streamlit (and tqdm) made unimportable: the GPU machine has only
# torch, torchvision, pandas, pyarrow, PyYAML and scikit-learn.
#
#   PYTHONPATH=. bash bench/gpu_check.sh [--device cuda|cpu] [--budget full|tiny] [--compile-seconds S] [--out DIR]
#
# --device cpu --budget tiny runs every step on a tiny network and data, compiled step skipped unless
# --compile-seconds is given (tests/test_gpu_check.py runs it so).
set -euo pipefail

DEVICE=cuda
BUDGET=full
COMPILE_SECONDS=
OUT=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --compile-seconds) COMPILE_SECONDS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --device, --budget, --compile-seconds, --out)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device: expected cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
case "$BUDGET" in full|tiny) ;; *) echo "gpu_check.sh: --budget: expected full or tiny, got $BUDGET" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d -t tally-gpu-check.XXXXXX)}
mkdir -p "$OUT"
START=$SECONDS

# A Python runner: cluster packages unimportable, the module (-m NAME) or script run as `python3 -m`/`python3`
# would, then the process's GPU memory peak.
cat > "$OUT/driver.py" <<'EOF'
import importlib.abc
import importlib.machinery
import runpy
import sys

BLOCKED = ("ray", "optuna", "streamlit", "tqdm")


class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Importing a blocked package fails as if it were not installed (probes with find_spec see no file)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self, origin=None)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (not on the GPU machine: bench/gpu_check.sh)",
                                  name=spec.name)

    def get_code(self, name):  # runpy's way in (driver.py -m NAME)
        self.create_module(importlib.machinery.ModuleSpec(name, self))


sys.meta_path.insert(0, Block())
module = sys.argv[1] == "-m"  # driver.py -m MODULE ARGS... | driver.py SCRIPT ARGS...
target, *args = sys.argv[2:] if module else sys.argv[1:]
sys.argv = [target, *args]
code = 0
try:
    if module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
import torch  # noqa: E402

if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
    print(f"GPU memory peak of this process: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
sys.exit(code)
EOF
run() { "$PY" "$OUT/driver.py" "$@"; }
stage() { echo; echo "== $* ($((SECONDS - START)) s)"; }

if [[ $BUDGET == full ]]; then
  CONFIGS=r18-64,r50-224
  BENCH_STEPS=(--steps 10 --blocks 9 --warmup 10)
  ARCH=resnet50; DATA="{source: embedded, image_size: 32}"; STEPS=40; BATCH=18
  COMPILE_SECONDS=${COMPILE_SECONDS:-150}
else
  CONFIGS=r10-32
  BENCH_STEPS=(--steps 1 --blocks 1 --warmup 1)
  ARCH=resnet10; DATA="{source: embedded, image_size: 16, max_per_class: 6}"; STEPS=2; BATCH=8
  COMPILE_SECONDS=${COMPILE_SECONDS:-0}
fi
[[ $DEVICE == cuda ]] && TRAIN_DEVICE=auto || TRAIN_DEVICE=cpu
[[ $DEVICE == cuda ]] && COMPILE_MODE=reduce-overhead || COMPILE_MODE=default

stage "environment"
"$PY" - "$DEVICE" <<'EOF'
import os
import sys

import torch

device = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, load average {os.getloadavg()}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu_check.sh: --device cuda but torch sees no CUDA device")
    free, total = torch.cuda.mem_get_info()
    print(f"{torch.cuda.get_device_name()}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
EOF

stage "1. training's step, eager: $CONFIGS"
run bench/train_step.py --device "$DEVICE" --configs "$CONFIGS" --modes eager "${BENCH_STEPS[@]}" | tee "$OUT/bench-eager.txt"

stage "2. tally train: 3 epochs of $ARCH on the embedded data (bf16 on CUDA)"
cat > "$OUT/check.yaml" <<EOF
data: $DATA
model: {arch: $ARCH, cut: layer2}
method: {name: tally}
train: {epochs: 3, warmup_epochs: 1, steps_per_epoch: $STEPS, batch_size: $BATCH, lr: 1.0e-4, bf16: true, device: $TRAIN_DEVICE}
EOF
run -m tally.cli train "$OUT/check.yaml" --out "$OUT/run" | tee "$OUT/train.txt"

stage "3. resume: epoch 1 on the CPU, then tally train --resume on $DEVICE"
"$PY" - "$OUT" <<'EOF'
import sys
from pathlib import Path

import torch

from tally.config import read_yaml_file, validate
from tally.training import RunContext, train_run

out = Path(sys.argv[1])
cfg = validate(read_yaml_file(out / "check.yaml"))
train_run(cfg, out / "resumed", stop_after_epoch=0, ctx=RunContext(device=torch.device("cpu"), progress=False))
print("epoch 1 done on the CPU; checkpoint:", out / "resumed" / "checkpoints" / "last.pt")
EOF
run -m tally.cli train "$OUT/check.yaml" --out "$OUT/resumed" --resume | tee "$OUT/resume.txt"
"$PY" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
for name in ("run", "resumed"):
    epochs = [json.loads(line) for line in (out / name / "epochs.jsonl").read_text().splitlines()]
    losses = ", ".join(f"{e['train_loss']:.4f}" for e in epochs)
    seconds = ", ".join(str(e["seconds"]) for e in epochs)
    print(f"{name}: train loss per epoch {losses}; seconds per epoch {seconds}")
EOF

stage "4. compiled ($COMPILE_MODE) against eager, within $COMPILE_SECONDS s"
if [[ $BUDGET == full ]]; then
  COMPILED=("r50-224 tally" "r18-64 tally" "r50-224 erm" "r18-64 erm" "r50-224 tally-joint" "r18-64 tally-joint")
else
  COMPILED=("r10-32 tally")
fi
DEADLINE=$((SECONDS + COMPILE_SECONDS))
for item in "${COMPILED[@]}"; do
  read -r config runner <<< "$item"
  left=$((DEADLINE - SECONDS))
  if (( left < 20 )); then
    echo "compiled $config $runner: skipped (compile budget spent; --compile-seconds to allow more)"
    continue
  fi
  timeout "$left" "$PY" "$OUT/driver.py" bench/train_step.py --device "$DEVICE" --configs "$config" --runners "$runner" \
    --modes eager,compiled --compile-mode "$COMPILE_MODE" "${BENCH_STEPS[@]}" | tee -a "$OUT/bench-compiled.txt" \
    || echo "compiled $config $runner: stopped after ${left} s (budget) or failed (exit $?)"
done

stage "summary"
echo "img/s, GPU memory peak (CUDA): $OUT/bench-eager.txt $OUT/bench-compiled.txt"
grep -h -E "img/s|px +(erm|tally)|compiled/eager|TALLY/ERM" "$OUT/bench-eager.txt" "$OUT"/bench-compiled.txt 2>/dev/null || true
grep -h -E "GPU memory peak|final metrics" "$OUT"/*.txt 2>/dev/null || true
"$PY" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
for name in ("run", "resumed"):
    metrics = json.loads((out / name / "metrics.json").read_text())
    print(f"final metrics ({name}): " + "; ".join(
        f"{split}: pair_acc_mean {m['pair_acc_mean']:.4f}, macro_f1 {m['macro_f1']:.4f}" for split, m in metrics.items()))
EOF
echo "gpu_check.sh: done in $((SECONDS - START)) s; files in $OUT"
