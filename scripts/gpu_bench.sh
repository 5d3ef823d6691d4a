#!/usr/bin/env bash
# The GPU figures the kernel issues ask for, after scripts/gpu_check.sh has passed on the same
# machine (it builds the extension; this script builds it too if it is missing):
#
#   models     hessfast bench, MLP, ResNet-18 and GPT-2 small at the baseline shapes, float32:
#              gradient, exact HVP, GGN-VP and K=8 HVP as ratios to the gradient, backends torch
#              and auto, the traced graph and CUDA graphs (targets: HVP <= 2.6x, GGN-VP <= 1.7x,
#              K=8 <= 2.1x per vector of the gradient; benchmarks/baselines/)
#   compiled   the same through Inductor (--modes traced,inductor), compile time in its own
#              column, with torch.compile of torch.func's HVP (which fails on ResNet-18 and GPT-2)
#   head       benchmarks/bench_cross_entropy.py --size full: the fused cross-entropy head at
#              V = 50,304 (target: peak <= 1/4 of autograd's)
#   attention  benchmarks/bench_attention_fused.py: GPT-2 small, batch 1, T = 4096 and 8192, and
#              the attention-only TFLOP/s, float32 like the baselines (targets: time and peak
#              <= 3x the SDPA gradient's)
#   rules      benchmarks/bench_activation.py, bench_layer_norm.py, bench_linear.py at large
#              shapes: every implementation's GB/s (TFLOP/s) against the ceilings of the same run
#
#   bash scripts/gpu_bench.sh                 # every part (about 12 minutes: split it across calls)
#   bash scripts/gpu_bench.sh models head     # some parts
#
# Each part has a time limit; results (JSON and markdown) and logs go to $OUT/gpu_bench.
set -uo pipefail
cd "$(dirname "$0")/.."

dir="${OUT:-$(mktemp -d)}/gpu_bench"
mkdir -p "$dir"
. scripts/gpu_steps.sh
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(models head attention rules)

if ! python -c "import hessfast._C" 2>/dev/null; then
  HESSFAST_BUILD_CUDA=1 step build 300 pip install -e . --no-build-isolation --no-deps
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$dir/gpu.txt" 2>&1

for part in "${parts[@]}"; do
  case "$part" in
    models)
      step models 300 python -m hessfast bench --model mlp,resnet18,gpt2 --size full \
        --backends torch,auto --modes traced,cudagraphs --no-peers --repeats 3 \
        --json "$dir/models.json" --markdown "$dir/models.md" ;;
    compiled)
      step compiled 420 python -m hessfast bench --model resnet18,gpt2 --size full \
        --backends auto --modes traced,inductor --compile --no-peers --repeats 3 \
        --json "$dir/compiled.json" --markdown "$dir/compiled.md" ;;
    head)
      step head 180 python benchmarks/bench_cross_entropy.py --size full --repeats 3 \
        --json "$dir/head.json" ;;
    attention)
      step attention 300 python benchmarks/bench_attention_fused.py --dtype float32 --seq-lens 4096,8192 \
        --max-t 0 --repeats 2 --json "$dir/attention.json" ;;
    rules)
      for op in activation layer_norm linear; do
        step "rules-$op" 120 python "benchmarks/bench_$op.py" --size large --k 8 --repeats 3 \
          --json "$dir/rules.json"
      done ;;
    *) echo "unknown part $part (models, compiled, head, attention, rules)" >&2; exit 2 ;;
  esac
done

echo
echo "hessfast GPU benchmarks: $(tr '\n' ' ' <"$dir/gpu.txt")"
echo
echo "| step | status | seconds | summary |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
[ -f "$dir/models.md" ] && cat "$dir/models.md"
[ -f "$dir/compiled.md" ] && cat "$dir/compiled.md"
for part in head attention rules-activation rules-layer_norm rules-linear; do
  [ -f "$dir/$part.log" ] && { echo; echo "## $part"; tail -40 "$dir/$part.log"; }
done
echo
echo "logs and JSON: $dir"
