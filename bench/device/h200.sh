#!/usr/bin/env bash
# There (device `run`, from the repository root, `carry: [".whl"]`): issue 10's GPU figure in one
# command. SD 1.5-shaped random weights (no download), 512x512, 30 steps, fp16: images/s through
# the whole agent (queue -> stored PNG) at max_batch 1, 4 and 8, next to diffusers alone in the
# same run. About 5 minutes on an H200. Results (table, JSON) land in $OUT.
# Dry run on this machine's CPU: PY=.venv/bin/python WHEELS=0 DEVICE=cpu SIZE=64 STEPS=2 BATCHES="1 2" TASKS=4
set -euo pipefail
OUT="${OUT:-/tmp/sdfleet-device}"; PY="${PY:-python3}"; mkdir -p "$OUT"
if [ "${WHEELS:-1}" = 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD/src:/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt" || true
"$PY" -c "import torch, diffusers, sdfleet; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" | tee -a "$OUT/gpu.txt"
"$PY" bench/agent_batching.py --sd15 --size "${SIZE:-512}" --steps "${STEPS:-30}" --batches ${BATCHES:-1 4 8} \
  --device "${DEVICE:-cuda}" --tasks "${TASKS:-48}" --repeat "${REPEAT:-1}" --results "$OUT" 2>&1 | tee "$OUT/agent_batching.txt"
