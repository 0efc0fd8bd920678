#!/usr/bin/env bash
# The whole GPU validation of ilm_dist as one command, for a GPU node that has torch but no registry.
#
#   bash bench/gpu_check.sh [--dry-run] [--stages a,b,...] [--fresh] OUT_DIR
#
# Stages (in order; caps in bench/gpu_check.py STAGES, at most TOTAL_S seconds per invocation):
#   env            device, driver, torch, nvcc, cores; on the GPU node no CUDA device stops the check
#   wheels         reassemble the carried wheel parts (.whl/parts, make gpu-wheels), verify, install
#   build          ilm_dist._C against this torch, parallel compile for this GPU's architecture; asserts
#                  that ilm_dist::bt_xcorr_loss has a CUDA kernel
#   op_tests       tests/ops/test_xcorr_op.py, the CUDA tests (which run only here) first, then the rest
#   op_bench       bench/xcorr.py --sizes full
#   nccl           one-rank NCCL start-up through ilm_dist's process-group start-up (nccl asked for)
#   data           a packed synthetic set (python -m data_tools.synthetic), made on the node
#   throughput     bench/pretrain_throughput.py: baseline / ilm_dist / synthetic, ResNet-50 224 px bf16, BT + MSE
#   data_pipeline  bench/data_pipeline.py: DALI GPU vs DALI CPU vs DataLoader with all cores
#   bn_stats       bench/bn_stats.py: BatchNorm running statistics under DeepSpeed bf16 vs float64
#   dali_buffers   bench/gpu_probes.py: a dropped DALI batch stays intact while a queued kernel reads it
#   dali_epochs    bench/gpu_probes.py: time to first batch and free memory over 20 tiny epochs; resume replay
#   train_step     bench/gpu_probes.py: peak memory of a training step, host-device syncs of three
# A failing stage is recorded (status, seconds, log tail) and the next one still runs. Records and results
# persist in the work folder ($GPU_CHECK_WORK, default .gpu_check/, ignored by git), so a later invocation
# on the same node skips stages that already passed for the same commit ($ILM_DIST_COMMIT); --fresh
# starts over. OUT_DIR receives summary.json, gpu_check.tar.gz and the benchmark JSONs (at most 8 files).
#
# --dry-run (CPU, CI): every stage's CPU side at tiny sizes, the wheel parts verified if built, and the
# exact commands for the GPU node printed (bench/gpu_check.py plan).
set -uo pipefail

usage() { sed -n '2,4p' "$0" >&2; exit 2; }
DRY_RUN=0 FRESH=0 ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --fresh) FRESH=1; shift ;;
    --stages) ONLY="${2:-}"; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[[ $# -eq 1 ]] || usage
OUT="$1"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
PY="${PYTHON:-python3}"
MODE=gpu
[[ $DRY_RUN -eq 1 ]] && MODE=dry-run
WORK="${GPU_CHECK_WORK:-$REPO/.gpu_check/$MODE}"
[[ $DRY_RUN -eq 1 || $FRESH -eq 1 ]] && rm -rf "$WORK"
mkdir -p "$OUT" "$WORK/logs" "$WORK/stages" "$WORK/results"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ILM_DIST_COMMIT="${ILM_DIST_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)}"
CORES="$(nproc)"
STAGE_NAMES="env wheels build op_tests op_bench nccl data throughput data_pipeline bn_stats dali_buffers dali_epochs"
STAGE_NAMES+=" train_step"
if [[ -n "$ONLY" ]]; then
  for name in ${ONLY//,/ }; do
    [[ " $STAGE_NAMES " == *" $name "* ]] || { echo "gpu_check.sh: unknown stage '$name' (stages: $STAGE_NAMES)" >&2; exit 2; }
  done
fi
TOTAL_S="$("$PY" -c 'import sys; sys.path.insert(0, "bench"); import gpu_check; print(gpu_check.TOTAL_S)')" || exit 1
START=$SECONDS

cap_of() { "$PY" -c "import sys; sys.path.insert(0, 'bench'); import gpu_check; print(gpu_check.STAGES['$1'][0])"; }

passed_before() {  # stage passed earlier on this node for this commit
  local record="$WORK/stages/$1.json"
  [[ -f "$record" ]] && "$PY" - "$record" "$ILM_DIST_COMMIT" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
sys.exit(0 if r["status"] == "passed" and r.get("commit") == sys.argv[2] else 1)
EOF
}

# run_stage NAME COMMAND...: run under the stage's cap (and what is left of TOTAL_S), then record it;
# returns non-zero only when the stage ran now and did not pass.
run_stage() {
  local name="$1"; shift
  if [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]]; then return 0; fi
  if [[ -z "$ONLY" && $DRY_RUN -eq 0 ]] && passed_before "$name"; then
    echo "[gpu_check] $name: passed earlier on this node, kept"; return 0
  fi
  local cap left budget log="$WORK/logs/$name.log"
  cap="$(cap_of "$name")"
  left=$(( TOTAL_S - (SECONDS - START) - 15 ))  # 15 s kept for the summary
  budget=$(( cap < left ? cap : left ))
  if (( budget < 5 )); then
    echo "no time left in the ${TOTAL_S} s of this invocation" > "$log"
    "$PY" bench/gpu_check.py record --work "$WORK" --name "$name" --rc 124 --seconds 0 --budget 0 --log "$log"
    return 1
  fi
  echo "[gpu_check] $name: starting (budget ${budget} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$budget" "$@" > "$log" 2>&1
  local rc=$?
  "$PY" bench/gpu_check.py record --work "$WORK" --name "$name" --rc "$rc" --seconds $(( SECONDS - t0 )) \
    --budget "$budget" --log "$log"
  (( rc == 0 || rc == 77 ))
}

R="$WORK/results"
[[ -d "$WORK/site" ]] && export PYTHONPATH="$PYTHONPATH:$WORK/site"  # wheels installed by an earlier call

STOP=0
if [[ $DRY_RUN -eq 1 ]]; then
  run_stage env "$PY" bench/gpu_check.py env --out "$R/env.json"
elif ! run_stage env "$PY" bench/gpu_check.py env --out "$R/env.json" --require-cuda; then
  # without CUDA every stage would run on the CPU (or fail slowly) and its numbers would mean nothing
  echo "[gpu_check] env failed: $(tail -n 1 "$WORK/logs/env.log"); stopping before the other stages" >&2
  STOP=1
fi

if [[ $DRY_RUN -eq 1 ]]; then
  run_stage wheels "$PY" bench/gpu_check.py install-wheels --work "$WORK" --verify-only
  # The extension as built here (make install); building it takes minutes on two cores.
  run_stage build "$PY" bench/gpu_check.py extension --out "$R/extension.json"
  run_stage op_tests "$PY" bench/gpu_check.py op-tests --out "$R/op_tests.json" --cuda-only
  run_stage op_bench "$PY" bench/xcorr.py --sizes tiny --dtypes float32 --repeats 1 --device cpu --threads 1 \
    --out "$R/xcorr.json"
  run_stage nccl "$PY" bench/gpu_check.py nccl --out "$R/nccl.json"
  run_stage data "$PY" -m data_tools.synthetic_dataset "$WORK/data" --num-classes 4 --per-class 10 --size 40 \
    --shard-size 16 --workers 1 --quiet
  run_stage throughput "$PY" bench/pretrain_throughput.py --shards "$WORK/data" --arch resnet18 --size 32 \
    --batch 2 --steps 1 --warmup 0 --losses mse --threads 1 --set moco.queue_size=16 --out "$R/pretrain_throughput.json"
  run_stage data_pipeline "$PY" bench/data_pipeline.py --shards "$WORK/data" --samples 8 --batch 4 --size 32 \
    --warmup 1 --repeats 1 --out "$R/data_pipeline.json"
  run_stage bn_stats "$PY" bench/bn_stats.py --arch resnet18 --size 32 --batch 2 --steps 1 --configs bf16 \
    --out "$R/bn_stats.json"
  run_stage dali_buffers "$PY" bench/gpu_probes.py dali-buffers --shards "$WORK/data" --batch 4 --size 32 \
    --pulls 3 --out "$R/dali_buffers.json"
  run_stage dali_epochs "$PY" bench/gpu_probes.py dali-epochs --shards "$WORK/data" --batch 4 --size 32 \
    --epochs 3 --steps 1 --resume-at 2 --compare 2 --out "$R/dali_epochs.json"
  run_stage train_step "$PY" bench/gpu_probes.py train-step --shards "$WORK/data" --arch resnet18 --batch 2 \
    --size 32 --warmup 1 --set moco.queue_size=16 --out "$R/train_step.json"
elif [[ $STOP -eq 0 ]]; then
  run_stage wheels "$PY" bench/gpu_check.py install-wheels --work "$WORK"
  [[ -d "$WORK/site" ]] && export PYTHONPATH="$PYTHONPATH:$WORK/site"
  ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)"
  run_stage build env MAX_JOBS="$CORES" TORCH_CUDA_ARCH_LIST="$ARCH" bash -c "'$PY' setup.py build_ext --inplace \
    && '$PY' bench/gpu_check.py extension --out '$R/extension.json' --require-cuda"
  run_stage op_tests "$PY" bench/gpu_check.py op-tests --out "$R/op_tests.json"
  run_stage op_bench "$PY" bench/xcorr.py --sizes full --repeats 5 --out "$R/xcorr.json"
  run_stage nccl "$PY" bench/gpu_check.py nccl --backend nccl --out "$R/nccl.json"
  # 5,120 images of 256 px: 4,096 train samples, 16 batches of 256 per epoch.
  run_stage data "$PY" -m data_tools.synthetic_dataset "$WORK/data" --num-classes 8 --per-class 640 --size 256 \
    --workers "$CORES" --quiet --overwrite
  run_stage throughput "$PY" bench/pretrain_throughput.py --shards "$WORK/data" --batch 256 --steps 15 \
    --warmup 5 --losses bt mse --curve-steps 20 --out "$R/pretrain_throughput.json"
  run_stage data_pipeline "$PY" bench/data_pipeline.py --shards "$WORK/data" --samples 2048 --batch 256 \
    --repeats 3 --out "$R/data_pipeline.json"
  run_stage bn_stats "$PY" bench/bn_stats.py --out "$R/bn_stats.json"
  run_stage dali_buffers "$PY" bench/gpu_probes.py dali-buffers --shards "$WORK/data" --out "$R/dali_buffers.json"
  run_stage dali_epochs "$PY" bench/gpu_probes.py dali-epochs --shards "$WORK/data" --out "$R/dali_epochs.json"
  run_stage train_step "$PY" bench/gpu_probes.py train-step --shards "$WORK/data" --out "$R/train_step.json"
fi

"$PY" bench/gpu_check.py summary --work "$WORK" --out "$OUT" --mode "$MODE"
status=$?
echo "[gpu_check] $MODE finished in $(( SECONDS - START )) s"
if [[ $DRY_RUN -eq 1 ]]; then
  "$PY" bench/gpu_check.py plan --json "$OUT/plan.json" || status=1
fi
exit $status
