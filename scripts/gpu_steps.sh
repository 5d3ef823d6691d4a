# Shared by scripts/gpu_check.sh and scripts/gpu_bench.sh (sourced, not run): the step runner.
# The caller sets $dir (logs go there); rows of the summary table accumulate in $rows.
declare -a rows

# step NAME LIMIT_S COMMAND...: run with a time limit, log to $dir/NAME.log, add a table row whose
# detail is the log's last summary line (pytest's, or the last line).
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS rc
  timeout "$limit" "$@" >"$dir/$name.log" 2>&1
  rc=$?
  local detail
  detail=$(grep -E "(passed|failed|error|skipped)" "$dir/$name.log" | grep -E "^[=]* ?[0-9]+ " | tail -1)
  [ -z "$detail" ] && detail=$(tail -1 "$dir/$name.log")
  local status=ok
  [ "$rc" -eq 124 ] && status="TIMEOUT (${limit}s)"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && status="FAIL (rc $rc)"
  rows+=("| $name | $status | $((SECONDS - start)) | ${detail//|/\\|} |")
}

