#!/usr/bin/env bash
# One device call: GPU tests, the decode step's launch variants at B = 1, the end-to-end bench
# (session 12 ran its L2-prefetch experiments with it; they were removed afterwards, e2e.md).
#   1. GPU tests (TESTS, as in tools/gpu_kernels.sh: "file[:expr] ...", "+" for spaces), in
#      parallel, at most TEST_TIMEOUT seconds
#   2. kvcomp bench decode at B = 1, 128K, 2048 tokens with the launch variants VARIANTS
#      (comma-separated names of kvcomp.bench.decode.LATENCY_VARIANTS; empty: skip)
#   3. kvcomp bench e2e --fuse all --methods E2E_METHODS at E2E_CONTEXTS x E2E_BATCHES (E2E_EXTRA:
#      more arguments, e.g. --profile)
# Logs and JSON to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
OUT="${OUT:-.out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
pids=()
for spec in ${TESTS:-}; do
    f="${spec%%:*}"
    sel=()
    expr="${spec#*:}"
    [ "$spec" != "$f" ] && sel=(-k "${expr//+/ }")
    timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider "${sel[@]}" "$f" \
        >"$OUT/test_$(basename "$f" .py).log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for log in "$OUT"/test_*.log; do [ -e "$log" ] && { echo "== $log"; tail -n 4 "$log"; }; done
if [ -n "${VARIANTS:-}" ]; then
    timeout "${DECODE_TIMEOUT:-150}" python3 - "$OUT" "$VARIANTS" "${DECODE_ARGS:---models qwen3-8b,qwen3-32b}" <<'PY' \
        > "$OUT/decode.log" 2>&1
import sys
import kvcomp.bench.decode as d
from kvcomp.cli import main
out, keep, extra = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split()
d.LATENCY_VARIANTS = {k: v for k, v in d.LATENCY_VARIANTS.items() if k in keep}
sys.exit(main(["bench", "decode", "--lengths", "131072", "--batches", "1", "--budgets", "2048",
               "--reps", "50", "--variants", "--json", f"{out}/decode_variants.json", *extra]))
PY
    echo "decode rc=$?"; tail -n 30 "$OUT/decode.log"
fi
# shellcheck disable=SC2086
timeout "${E2E_TIMEOUT:-300}" python3 -m kvcomp.cli bench e2e --fuse all --steps 64 --prefill-ctx 0 \
    --contexts "${E2E_CONTEXTS:-131072}" --batches "${E2E_BATCHES:-1}" ${E2E_EXTRA:-} \
    --methods "${E2E_METHODS:-kvcomp,dense_kv}" --time-limit "${E2E_LIMIT:-240}" \
    --json "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1
echo "e2e rc=$?"
grep -E "verified|speedup|^ *[0-9]+ +[0-9] |Error|error" "$OUT/e2e.log" | cut -c1-400 | tail -n 30
