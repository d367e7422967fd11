#!/usr/bin/env bash
# The one GPU check for a lent GPU machine (the device tool), run from the repo root; all of
# it finishes within 8 minutes and writes JSON to $OUT (or benchmarks/out):
#   gpu_tests.json  the GPU tests (pytest -m gpu), incl. one training step under
#                   torch.cuda.set_sync_debug_mode("error")
#   step.json       training steps, varlen vs padded attention, MFU by step_flops
#                   (6 N T + 12 L d Σ sᵢ²), the reference 30M model (8x512, 8 heads, bf16),
#                   views of <= 1,000 genes (2 x <= 1,000 tokens per cell); the loader's
#                   share (real loader + views vs batches already on the device); the
#                   embedding rate (inference sequences/s)
#   summary.json    both, plus the machine
#
# The machine's image has torch, lightning, tensorstore, pytest, numpy; the rest travels
# as wheels in .whl/ (ignored by git). Prepare them once here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 hydra-core==1.3.2
# and compile a small project for the benchmark's batches (make demo does), then run it
# with carry=[".whl", "projects/demo/compiled"]:
#   bash benchmarks/gpu_check.sh
# DRY=1 runs the same steps on a CPU in about two minutes (small model, few steps, a
# synthetic project compiled on the fly when STORES is unset): a check of the script.
set -euo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
out=${OUT:-benchmarks/out}
mkdir -p "$out"
dry=${DRY:-0}
if [ "$dry" = 1 ]; then
  steps=(--steps 3 --warmup 1 --batch-size 16 --max-tokens 64 --small)
  if [ -z "${STORES:-}" ]; then
    proj=$(mktemp -d)/project
    $PY -m preprocess.synth PATH.PROJECT_PATH="$proj" synth.n_cells=200 synth.n_genes=3000 \
      synth.pretrained_dim=8 >/dev/null
    $PY -m preprocess.compile PATH.PROJECT_PATH="$proj" compile.register=false \
      compile.workers=1 >/dev/null
    STORES=$proj/compiled
  fi
else
  steps=(--steps 20 --warmup 3 --batch-size 128 --max-tokens 1000)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
$PY -c "import flash_attn" 2>/dev/null && echo "flash-attn: importable" || echo "flash-attn: absent (torch varlen backend)"
# 1. GPU tests (skipped, and reported as such, without CUDA)
set +e
timeout 200 $PY -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_model.py \
  tests/test_train.py 2>&1 | tee "$out/gpu_tests.log"
rc=${PIPESTATUS[0]}
set -e
$PY - "$out" "$rc" <<'PYEOF'
import json, re, sys
out, rc = sys.argv[1], int(sys.argv[2])
log = open(f"{out}/gpu_tests.log").read()
tests = [{"test": t, "outcome": o} for o, t in re.findall(r"^(PASSED|FAILED|SKIPPED|ERROR) (\S+)", log, re.M)]
json.dump({"returncode": rc, "tests": tests}, open(f"{out}/gpu_tests.json", "w"), indent=2)
PYEOF
# 2. steps, loader share, embedding rate
timeout 240 $PY benchmarks/step.py --stores "${STORES:-projects/demo/compiled}" "${steps[@]}" \
  --json "$out/step.json" 2>&1 | tee "$out/step.log"
$PY - "$out" <<'PYEOF'
import json, sys
out = sys.argv[1]
summary = {"gpu_tests": json.load(open(f"{out}/gpu_tests.json")), **json.load(open(f"{out}/step.json"))}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps({k: summary["gpu_tests"][k] for k in ("returncode",)} | {"results": summary["results"], "loader": summary["loader"], "embedding": summary["embedding"]}, indent=1))
PYEOF
