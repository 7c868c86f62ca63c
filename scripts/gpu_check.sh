#!/usr/bin/env bash
# One H100 / H200: the GPU-sized main job (experiment=gpu_quick), the GPU tests and the MoE-LoRA
# benchmark on the pipeline's own experts and gate, everything under one folder.
#
#   bash scripts/gpu_check.sh [OUT_DIR] [STAGES...]     # STAGES: any of pipeline tests bench code (default all)
#
# code: greedy pass@1 on every HumanEval problem and 100 MBPP test problems (experiment=quick_cpu_code)
# on the pipeline's experts, router and gate.
# Each stage has a wall-clock limit (GPU_CHECK_PIPELINE_S, _TESTS_S, _BENCH_S, _CODE_S) so
# that a slow stage still leaves the others their time; OUT_DIR/summary.json records each stage's exit
# status and seconds, the device and the package versions. Logs: OUT_DIR/<stage>.log.
# GPU_CHECK_EXPERIMENT / GPU_CHECK_OVERRIDES change the pipeline's experiment / add overrides (dry runs);
# GPU_CHECK_BENCH_ARGS adds bench_moelora.py arguments, GPU_CHECK_CODE_OVERRIDES the code stage's.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_check/$(date +%Y%m%d-%H%M%S)}
shift || true
stages=${*:-pipeline tests bench code}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
py=${PYTHON:-python}
status=()

run_stage() {  # name, limit_s, command...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$out/stages.txt"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  status+=("\"$name\": {\"rc\": $rc, \"seconds\": $(( $(date +%s) - start ))}")
  echo "   rc=$rc after $(( $(date +%s) - start ))s" | tee -a "$out/stages.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$py" -c 'import torch, transformers, peft, lightning; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__, "lightning", lightning.__version__)'
} >"$out/device.txt" 2>&1

for stage in $stages; do
  case $stage in
    pipeline)  # router=minilm: the default encoder's five wheels (404 MB) do not fit a 64 MiB carry
      run_stage pipeline "${GPU_CHECK_PIPELINE_S:-1800}" \
        "$py" scripts/run_pipeline.py "experiment=${GPU_CHECK_EXPERIMENT:-gpu_quick}" router=minilm \
        "hydra.run.dir=$out/pipeline" ${GPU_CHECK_OVERRIDES:-} ;;
    tests)
      run_stage tests "${GPU_CHECK_TESTS_S:-240}" \
        "$py" -m pytest -m gpu -q -p no:cacheprovider tests/moelora/test_moelora_gpu.py tests/test_experts.py ;;
    bench)
      experts=$out/pipeline/experts/adapters gate=$out/pipeline/moelora/moelora
      if [ -d "$experts/law" ] && [ -d "$gate" ]; then
        args=(--experts-dir "$experts" --gate-dir "$gate")
      else
        args=(--random-experts)  # the pipeline did not get that far
      fi
      run_stage bench "${GPU_CHECK_BENCH_S:-600}" "$py" scripts/bench_moelora.py "${args[@]}" ${GPU_CHECK_BENCH_ARGS:-} ;;
    code)
      p=$out/pipeline
      run_stage code "${GPU_CHECK_CODE_S:-900}" \
        "$py" scripts/evaluate.py experiment=quick_cpu_code "experts_dir=$p/experts/adapters" \
        "router_dir=$p/router/router" "moelora_dir=$p/moelora/moelora" data.eval_batch_size=32 \
        "hydra.run.dir=$out/code" ${GPU_CHECK_CODE_OVERRIDES:-} ;;
    *) echo "unknown stage $stage (expected pipeline, tests, bench, code)" >&2; exit 2 ;;
  esac
done

{ printf '{"device": %s, "stages": {' "$("$py" -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read().strip()))' "$out/device.txt")"
  (IFS=,; printf '%s' "${status[*]}")
  printf '}}\n'
} >"$out/summary.json"
cat "$out/summary.json"
