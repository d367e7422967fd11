#!/usr/bin/env bash
# One short GPU check for a lent GPU machine (the device tool), run from the repo root;
# finishes in well under 8 minutes: the GPU tests, then the training-step benchmark
# (varlen vs padded attention, the reference 30M model, bf16).
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
set -euo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python3 -c "import flash_attn" 2>/dev/null && echo "flash-attn: importable" || echo "flash-attn: absent (torch varlen backend)"
timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_model.py 2>&1 | tee "$out/gpu_tests.log"
timeout 240 python3 benchmarks/step.py --stores "${STORES:-projects/demo/compiled}" \
  --steps 20 --warmup 3 --json "$out/step.json" 2>&1 | tee "$out/step.log"
