#!/usr/bin/env bash
# One device call (session 6): programmatic dependent launch end to end.
#   1. kvcomp bench decode at B = 1 (128K; the latency-bound step, its launch-knob variants)
#   2. kvcomp bench e2e --fuse all with PDL (the default) and with KVCOMP_PDL=0, same contexts
#      and batches (E2E_ARGS), JSON and logs to $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
OUT="${OUT:-.out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
if [ "${SKIP_DECODE:-0}" != "1" ]; then
    timeout "${DECODE_TIMEOUT:-110}" python3 -m kvcomp.cli bench decode --lengths 131072 --batches 1 \
        --budgets 2048,10% --reps 50 --json "$OUT/decode_b1.json" > "$OUT/decode_b1.log" 2>&1
    echo "decode rc=$?"; tail -n 16 "$OUT/decode_b1.log"
fi
E2E_ARGS="${E2E_ARGS:---fuse all --contexts 131072,65536 --batches 1,4 --steps 64 --methods kvcomp,dense_kv --prefill-ctx 0}"
for pdl in ${PDL_MODES:-1 0}; do
    # shellcheck disable=SC2086
    KVCOMP_PDL=$pdl timeout "${E2E_TIMEOUT:-230}" python3 -m kvcomp.cli bench e2e $E2E_ARGS \
        --time-limit "${E2E_LIMIT:-170}" --json "$OUT/e2e_pdl$pdl.json" > "$OUT/e2e_pdl$pdl.log" 2>&1
    echo "e2e KVCOMP_PDL=$pdl rc=$?"
    grep -E "verified|speedup|^ *[0-9]+ +[0-9] " "$OUT/e2e_pdl$pdl.log" | tail -n 14
done
