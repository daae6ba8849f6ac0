#!/usr/bin/env bash
# Device checks on a CUDA machine with no network: the CUDA paths (fp16 with GradScaler, bf16),
# speed and memory against MONAI, stability (torture grid) and steps-to-quality (convergence).
# Wheels for packages that machine lacks are carried in .whl/, and the MNI template in .gpu_data/.
#   OUT=benchmarks/out bash benchmarks/gpu_checks.sh
# Issue 10's speed checks only (about 9 minutes): ONLY_SPEED=1 OUT=benchmarks/gpu_results bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export MEDVAE_MNI_T1=${MEDVAE_MNI_T1:-.gpu_data/mni152_t1_1mm.nii.gz}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, monai, accelerate; print('torch', torch.__version__, 'monai', monai.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/gpu.txt"
section() { local name=$1 limit=$2; shift 2; echo "=== $name"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? seconds=$((SECONDS - t0))" | tee -a "$OUT/$name.log"
  grep -E '^\||^wrote|Error|error' "$OUT/$name.log" | grep -v Warning | tail -60; }
# Issue 10: steps at 64/128/160^3 (fp32, bf16, fp16; batch 1 and 2), then the norm+activation
# candidates, the largest crop within 40 GB and the roofline share; each part saves its JSON as it ends.
section gpu_speed "${SPEED_LIMIT:-300}" python3 benchmarks/gpu_speed.py --parts steps --sizes ${SPEED_SIZES:-64 128 160} --repeats 5 --warmup 2 --rounds 2 --json "$OUT/gpu_speed.json"
section gpu_speed_extra "${EXTRA_LIMIT:-240}" python3 benchmarks/gpu_speed.py --parts roofline largest_crop candidates --repeats 5 --warmup 2 --rounds 1 --json "$OUT/gpu_speed_extra.json"
if [ -n "${ONLY_SPEED:-}" ]; then exit 0; fi
section torture "${TORTURE_LIMIT:-200}" python3 benchmarks/torture.py --seeds ${TORTURE_SEEDS:-2} --steps ${TORTURE_STEPS:-30} --precisions ${TORTURE_PRECISIONS:-fp16 bf16 fp32} --json "$OUT/torture.json"
section convergence "${CONVERGENCE_LIMIT:-170}" python3 benchmarks/convergence.py --steps ${CONVERGENCE_STEPS:-400} --eval-every 50 --peer-lrs 1e-4 1e-3 --medvae-lrs 1e-3 3e-3 --json "$OUT/convergence.json"
if [ -f benchmarks/inference_cuda.py ]; then
  section inference_cuda "${INFERENCE_LIMIT:-60}" python3 benchmarks/inference_cuda.py --json "$OUT/inference_cuda.json"
fi
