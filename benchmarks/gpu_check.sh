#!/usr/bin/env bash
# The checks that need a GPU, in one command, for a session that is lent one (<= 8 min):
#   1. training step of the released FairVision architecture (`--preset paper`: ViT-B/16 fundus
#      + ViT-B/16 over 10 OCT slices), fp16: step time and peak memory of multifair,
#      multifair_released and multifair_adam against erm (targets <= 1.05x time, <= 1.02x memory);
#   2. data loading from the preprocessing cache: samples/s of a DataLoader with <= 2 workers
#      (target >= 1,000) and one core's cached read vs the released npz pipeline (>= 20x);
#   3. torchrun on one GPU: `multifair train` launched by torchrun on CUDA, and NCCL itself -
#      a process group of one running the real step through DistributedDataParallel vs the
#      flat all-reduce (benchmarks/bench_ddp.py: time ratio, and that both train alike);
#   4. a table of the figures against their targets.
# Everything printed also lands in $OUT (default runs/gpu_check): gpu_check.log and each
# step's raw output. Record the figures in docs/benchmarks.md.
#
#   bash benchmarks/gpu_check.sh                  # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry-run        # the same steps at toy sizes on the CPU
#                                                 # (~1 min): checks the script, not the figures
#   bash benchmarks/gpu_check.sh --image-only [IMAGE_SECONDS]   # default 240
# The last form runs issue 6's image-encoder benchmark (configs/benchmarks/
# synth_fairvision_effnet.yaml: pretrained EfficientNet-Lite0 encoders, whole seeds first, cut
# after IMAGE_SECONDS) alone: its missing runs, e.g. rows added since the last GPU session (carry
# runs/benchmarks/synth_fairvision_effnet so that finished runs are not redone), and the run
# directories without checkpoints in $OUT/<benchmark name>_runs.tar.gz, to collect here with
#   multifair benchmark collect runs/benchmarks/synth_fairvision_effnet
# IMAGE_CONFIG=configs/benchmarks/<name>.yaml runs another image benchmark instead (its output
# must be runs/benchmarks/<name>).
set -u -o pipefail
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mode=gpu
case "${1:-}" in
  --image-only) mode=image; shift ;;
  --dry-run) mode=dry; shift ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --image-only [IMAGE_SECONDS]]" >&2; exit 2 ;;
esac
step() { echo; echo "== $* [$(date +%T)]"; }

if [ "$mode" = image ]; then
image_seconds=${1:-240}
image_config=${IMAGE_CONFIG:-configs/benchmarks/synth_fairvision_effnet.yaml}
bench=runs/benchmarks/$(basename "$image_config" .yaml)
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

# sizes: the real ones on a GPU; toy ones in a dry run (the same code paths on the CPU)
if [ "$mode" = gpu ]; then
  device=cuda
  step_args=(--preset paper --device cuda --amp fp16 --rounds 5 --steps 10)
  loader_args=(--n 24 --seconds 3)
  ddp_args=(--device cuda --world-size 1 --preset paper --batch 32 --amp bf16 --rounds 4 --steps 5)
else
  device=cpu
  step_args=(--preset small --device cpu --amp off --rounds 1 --steps 1 --warmup 1 --threads 1)
  loader_args=(--n 20 --seconds 0.2)
  ddp_args=(--device cpu --world-size 1 --batch 4 --rounds 1 --steps 1 --warmup 1 --methods erm)
fi
nccl_run=/tmp/mf_gpu_check_torchrun
status=0

{
step "environment ($mode)"
if [ "$mode" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
$py -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "(no GPU)")'

step "1. training step, erm vs multifair / multifair_released / multifair_adam"
timeout 150 $py benchmarks/bench_step.py "${step_args[@]}" \
  --methods erm,multifair,multifair_released,multifair_adam | tee "$out/step.txt" || status=1

step "2. data loading from the cache"
timeout 120 $py benchmarks/bench_loader.py "${loader_args[@]}" | tee "$out/loader.txt" || status=1

step "3a. torchrun, one process on $device: multifair train (diabetes table, 2 epochs)"
rm -rf "$nccl_run"
timeout 90 $py -m torch.distributed.run --standalone --nproc_per_node 1 -m multifair train \
  configs/diabetes.yaml train.device="$device" train.epochs=2 train.progress=false \
  output.n_boot=0 --out "$nccl_run" > "$out/torchrun.txt" 2>&1 || status=1
tail -n 4 "$out/torchrun.txt"

step "3b. NCCL (gloo in a dry run): a process group of one, DDP vs flat all-reduce"
timeout 100 $py -W ignore benchmarks/bench_ddp.py "${ddp_args[@]}" | tee "$out/ddp.txt" || status=1

step "4. figures against the targets"
$py - "$out" "$nccl_run" "$mode" <<'EOF'
import json, re, sys
from pathlib import Path

out, run, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "dry"
read = lambda name: (out / name).read_text() if (out / name).is_file() else ""
rows = []  # (figure, value, target, verdict)

def add(figure, value, target, ok):
    """ok: True/False against the target, None for a figure without one; a value that is
    missing always fails. A dry run's toy figures are not judged."""
    if value.startswith(("missing", "failed")):
        verdict = "MISSING"
    elif ok is None or dry:
        verdict = "dry run" if dry and ok is not None else "n/a"
    else:
        verdict = "meets" if ok else "MISSES"
    rows.append((figure, value, target, verdict))

# bench_step rows: method, median ms, min, max, ratio[, peak MiB, mem ratio]
step = {}
for line in read("step.txt").splitlines():
    parts = line.split()
    if parts and parts[0] in ("erm", "multifair", "multifair_released", "multifair_adam") and len(parts) >= 5:
        try:
            step[parts[0]] = [float(x) for x in parts[1:]]
        except ValueError:
            pass
for name in ("multifair", "multifair_released", "multifair_adam"):
    if name not in step or "erm" not in step:
        add(f"step time {name} / erm", "missing (see step.txt)", "<= 1.05", False)
        continue
    ratio = step[name][3]
    add(f"step time {name} / erm", f"{ratio:.3f} ({step[name][0]:.1f} vs {step['erm'][0]:.1f} ms)", "<= 1.05", ratio <= 1.05)
    if len(step[name]) >= 6:
        mem = step[name][5]
        add(f"peak memory {name} / erm", f"{mem:.3f} ({step[name][4]:.0f} MiB)", "<= 1.02", mem <= 1.02)
    else:
        add(f"peak memory {name} / erm", "not measured (no GPU)", "<= 1.02", None)

# bench_loader rows: | path | samples/s | ms/sample | ratio x |
loader = {}
for line in read("loader.txt").splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 4 and re.match(r"^[\d.]+$", cells[1]):
        loader[cells[0]] = (float(cells[1]), float(cells[3].rstrip("x")))
workers = [v[0] for k, v in loader.items() if k.startswith("DataLoader, cache, 1 worker") or k.startswith("DataLoader, cache, 2 workers")]
if workers:
    best = max(workers)
    add("cached DataLoader, <= 2 workers", f"{best:.0f} samples/s", ">= 1000", best >= 1000)
else:
    add("cached DataLoader, <= 2 workers", "missing (see loader.txt)", ">= 1000", False)
single = loader.get("cache (per sample)")
add("cached read vs released npz, 1 core", f"{single[1]:.0f}x" if single else "missing (see loader.txt)", ">= 20x", bool(single and single[1] >= 20))

# torchrun: the run finished and says where it ran
try:
    env = json.loads((run / "env.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    add("torchrun, 1 process: multifair train", f"{env['device']}, world_size {env['world_size']}, test AUC {metrics['test']['overall']['auc']:.3f}", "finishes", True)
except (OSError, KeyError, ValueError):
    add("torchrun, 1 process: multifair train", "failed (see torchrun.txt)", "finishes", False)

# bench_ddp rows: method, path, median ms, min, ratio to flat, max |param - flat|
ddp = [l.split() for l in read("ddp.txt").splitlines() if len(l.split()) == 6 and l.split()[1] == "ddp"]
for parts in ddp:
    add(f"DDP / flat all-reduce step time, {parts[0]}", f"{parts[4]} (params differ by {parts[5]})", "(info)", None)
if not ddp:
    add("DDP / flat all-reduce step time", "missing (see ddp.txt)", "(info)", None)

w = max(len(r[0]) for r in rows)
v = max(len(r[1]) for r in rows)
print(f"| {'figure':<{w}} | {'value':<{v}} | target   | verdict |")
print(f"|{'-' * (w + 2)}|{'-' * (v + 2)}|----------|---------|")
for figure, value, target, verdict in rows:
    print(f"| {figure:<{w}} | {value:<{v}} | {target:<8} | {verdict:<7} |")
sys.exit(1 if any(r[3] in ("MISSES", "MISSING") for r in rows) else 0)
EOF
[ $? -eq 0 ] || status=1
step "done (exit $status)"
exit $status
} 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
