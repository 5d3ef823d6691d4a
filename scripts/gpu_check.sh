#!/usr/bin/env bash
# The GPU check of hessfast's kernels, for a fresh GPU machine with torch already installed:
#
#   0. hessfast selftest, first: every Triton kernel (and the torch rules) on this GPU against the
#      float64 torch reference, one table row per op, backend and dtype (before the build, so that
#      a failing build still leaves the Triton verdicts); after the build, the same for the CUDA
#      extension (selftest-cuda);
#   1. build the CUDA extension hessfast._C against that torch (pip install -e . without build
#      isolation, HESSFAST_BUILD_CUDA=1 so that a missing toolkit fails here);
#   2. run the GPU tests: tests/cuda (the CUDA kernels against the float64 oracle, opcheck,
#      dispatch) and tests/triton (the Triton kernels compiled for the GPU);
#   3. time the kernels against the torch rules: benchmarks/bench_activation.py and
#      bench_layer_norm.py (one large case each, every implementation, K = 8) and
#      bench_cross_entropy.py (the fused head, small size);
#
# and print one short table. Sized to finish in about 5 minutes (each step has a time limit), so a
# rerun fits in a 15-minute GPU slot. Logs and JSON go to $OUT/gpu_check (or a temporary folder).
#
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

dir="${OUT:-$(mktemp -d)}/gpu_check"
mkdir -p "$dir"
export HESSFAST_BUILD_CUDA=1

. scripts/gpu_steps.sh

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$dir/gpu.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
  >>"$dir/gpu.txt" 2>&1

step selftest 240 python -m hessfast selftest
step build 300 pip install -e . --no-build-isolation --no-deps -v
step selftest-cuda 120 python -m hessfast selftest --backend cuda
step tests-cuda 180 python -m pytest -q -p no:cacheprovider tests/cuda
step tests-triton 240 python -m pytest -q -p no:cacheprovider tests/triton
step bench-activation 90 python benchmarks/bench_activation.py --size large --k 8 --repeats 3 \
  --cases "gelu tanh 8192×4096" --json "$dir/bench-rules.json"
step bench-layer-norm 90 python benchmarks/bench_layer_norm.py --size large --k 8 --repeats 3 \
  --cases "layer_norm 8192×4096,rms_norm 8192×4096" --json "$dir/bench-rules.json"
step bench-cross-entropy 120 python benchmarks/bench_cross_entropy.py --size small --repeats 3 \
  --json "$dir/bench-cross-entropy.json"

echo
echo "hessfast GPU check: $(tr '\n' ' ' <"$dir/gpu.txt")"
echo
echo "| step | status | seconds | summary |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
# the kernel timings: per case, each implementation's hvp time and its speed-up over the torch rule
python - "$dir/bench-rules.json" <<'EOF'
import json
import sys

try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"(no kernel timings: {e})")
print("\n| case (K = 8) | torch rule hvp | triton hvp | cuda hvp |")
print("|---|---|---|---|")
for fam in data["families"].values():
    for row in fam["cases"]:
        m = row.get("methods", {})
        base = m.get("rule hvp", {}).get("seconds")
        cells = []
        for name in ("rule hvp", "triton hvp", "cuda hvp"):
            e = m.get(name, {})
            if "seconds" in e:
                speed = f" ({base / e['seconds']:.1f}×)" if base and name != "rule hvp" else ""
                cells.append(f"{e['seconds'] * 1e3:.2f} ms{speed}")
            else:
                cells.append(e.get("error", row.get("error", "n/a"))[:60])
        print(f"| {row['case']} | " + " | ".join(cells) + " |")
EOF
echo
echo "hessfast selftest (Triton and torch; then the CUDA extension):"
grep -E "^\|" "$dir/selftest.log" 2>/dev/null | grep -vE "\| skip: " || echo "(no table: see $dir/selftest.log)"
grep -E "^\|" "$dir/selftest-cuda.log" 2>/dev/null | grep -vE "\| skip: |^\| op family|^\|---" || true
echo
echo "logs: $dir"
