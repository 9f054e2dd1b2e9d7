#!/usr/bin/env bash
# The checks that need a GPU, in one command, for a session that is lent one (a few minutes):
#   1. the training step of the released FairVision architecture (`--preset paper`: ViT-B/16
#      fundus + ViT-B/16 over 10 OCT slices) for erm vs multifair / multifair_released /
#      multifair_adam: step-time ratio and peak memory (spec/performance.md targets), fp16;
#   2. issue 6's image-encoder benchmark (configs/benchmarks/synth_fairvision_effnet.yaml:
#      pretrained EfficientNet-Lite0 encoders, whole seeds first, cut after IMAGE_SECONDS), with
#      the model tests running beside it on the CPU (timm is installed on such machines);
#   3. torchrun with NCCL (one process) training the demo model on the GPU;
#   4. the step benchmark again in bf16.
# Everything printed also lands in $OUT (default runs/gpu_check): the log, and the image
# benchmark's run directories without checkpoints (<benchmark name>_runs.tar.gz) to collect here with
#   multifair benchmark collect runs/benchmarks/synth_fairvision_effnet
#
#   bash benchmarks/gpu_check.sh [IMAGE_SECONDS]        # default 240
#   bash benchmarks/gpu_check.sh --image-only [IMAGE_SECONDS]
# The second form runs step 2 alone (no model tests): the benchmark's missing runs, e.g. rows
# added to the config since the last GPU session (carry runs/benchmarks/synth_fairvision_effnet
# so that finished runs are not redone). IMAGE_CONFIG=configs/benchmarks/<name>.yaml runs
# another image benchmark instead (its output must be runs/benchmarks/<name>), e.g.
# synth_fairvision_large_effnet_groupaware.yaml.
set -u -o pipefail
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
image_only=0
if [ "${1:-}" = "--image-only" ]; then image_only=1; shift; fi
image_seconds=${1:-240}
image_config=${IMAGE_CONFIG:-configs/benchmarks/synth_fairvision_effnet.yaml}
bench=runs/benchmarks/$(basename "$image_config" .yaml)
step() { echo; echo "== $* [$(date +%T)]"; }

if [ "$image_only" = 1 ]; then
{
step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step "image-encoder benchmark only (${image_seconds} s)"
timeout "$image_seconds" $py -m multifair benchmark "$image_config" --no-report
$py -m multifair benchmark collect "$bench" --no-report
tar czf "$out/$(basename "$bench")_runs.tar.gz" --exclude='checkpoints' --exclude='*.pt' "$bench"
step "done"
} 2>&1 | tee "$out/gpu_check.log"
exit 0
fi

{
step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'

step "1. training step, paper preset, fp16"
timeout 170 $py benchmarks/bench_step.py --preset paper --device cuda --amp fp16 \
  --methods erm,multifair,multifair_released,multifair_adam --rounds 5 --steps 10

step "2. image-encoder benchmark (${image_seconds} s), model tests beside it on the CPU"
(timeout 200 $py -m pytest -q -p no:cacheprovider tests/models >"$out/pytest_models.log" 2>&1; \
  echo "pytest tests/models exit $?" >>"$out/pytest_models.log") &
timeout "$image_seconds" $py -m multifair benchmark "$image_config" --no-report
$py -m multifair benchmark collect "$bench" --no-report
tar czf "$out/$(basename "$bench")_runs.tar.gz" --exclude='checkpoints' --exclude='*.pt' "$bench"
wait
tail -n 5 "$out/pytest_models.log"

step "3. torchrun, NCCL, one process, 2 epochs of the demo model on the GPU"
rm -rf /tmp/mf_nccl
timeout 120 $py -m torch.distributed.run --standalone --nproc_per_node 1 -m multifair train configs/demo.yaml \
  data.root=data/synth/fairvision_main train.epochs=2 train.device=cuda --out /tmp/mf_nccl \
  | tail -n 12
$py -c 'import json; e = json.load(open("/tmp/mf_nccl/env.json")); print("env.json:", e["device"], "world_size", e["world_size"])' || true

step "4. training step, paper preset, bf16"
timeout 150 $py benchmarks/bench_step.py --preset paper --device cuda --amp bf16 \
  --methods erm,multifair,multifair_adam --rounds 5 --steps 10
step "done"
} 2>&1 | tee "$out/gpu_check.log"
