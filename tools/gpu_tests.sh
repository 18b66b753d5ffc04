#!/usr/bin/env bash
# Every GPU test of the repository on the device machine (`pytest -m gpu`), one pytest process per
# test file (hamming_topk's split in two: it compiles the most kernels), PARALLEL at a time
# (default 12: Triton's compiles, most of the time on a fresh machine, run on several cores; the
# tests check results, none is timed). Files: those that mark GPU tests, or FILES="a.py b.py".
# One log in $OUT/pytest_gpu.log (the device tool returns few files); a summary line per file
# and the total last. Exit status 1 if any file failed or timed out (TEST_TIMEOUT s, default 500).
#   OUT=$OUT bash tools/gpu_tests.sh
#   FILES="tests/core/test_gemv.py" bash tools/gpu_tests.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
OUT="${OUT:-.out}"
mkdir -p "$OUT"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ -n "${FILES:-}" ]; then
    specs=$FILES
else
    specs=$(grep -l "pytest.mark.gpu" -r tests --include="test_*.py" | sort |
            sed 's#^\(.*test_hamming_topk_kernel.py\)$#\1:mma_scan \1:not+mma_scan#')
fi
tlogs="$(mktemp -d)"
run_one() {  # spec = file[:pytest -k expression, "+" for spaces]
    local spec="$1" f="${1%%:*}" sel=()
    [ "$spec" != "$f" ] && sel=(-k "${spec#*:}") && sel[1]="${sel[1]//+/ }"
    local log="$tlogs/$(echo "$spec" | tr '/:+' '___').log"
    timeout "${TEST_TIMEOUT:-500}" python3 -m pytest -q -m gpu -p no:cacheprovider "${sel[@]}" "$f" >"$log" 2>&1
    local rc=$?
    echo "rc=$rc" >>"$log"
    printf '%-72s rc=%s  %s\n' "$spec" "$rc" "$(grep -E '[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s' "$log" | tail -1)"
}
export -f run_one
export tlogs
# shellcheck disable=SC2086
printf '%s\n' $specs | xargs -P "${PARALLEL:-12}" -I{} bash -c 'run_one "$@"' _ {} | sort | tee "$OUT/pytest_gpu_summary.txt"
for log in "$tlogs"/*.log; do
    echo "== $(basename "$log")"; cat "$log"
done >"$OUT/pytest_gpu.log"
fails=$(grep -c "rc=[^05]" "$OUT/pytest_gpu_summary.txt")
total=$(grep -ohE "[0-9]+ passed" "$OUT/pytest_gpu_summary.txt" | awk '{s += $1} END {print s + 0}')
skipped=$(grep -ohE "[0-9]+ skipped" "$OUT/pytest_gpu_summary.txt" | awk '{s += $1} END {print s + 0}')
echo "GPU tests: $total passed, $skipped skipped in $(wc -l <"$OUT/pytest_gpu_summary.txt") files, $fails file(s) failed or timed out"
[ "$fails" = "0" ]
