#!/usr/bin/env bash
# One device call for issue 6 with the fused decoder (kvcomp.fusion.FusedDecode):
#   1. GPU tests of the fused ops and of the attention kernels the decode step uses; if the
#      sparse attention's fused merge fails them, the bench runs with FUSED_MERGE = False
#   2. kvcomp bench e2e --fuse all (extra arguments passed on), JSON to $OUT/e2e.json
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/gpu_env.sh
OUT="${OUT:-.out}"
mkdir -p "$OUT"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/core/test_gemv.py tests/core/test_norm_act.py \
    tests/core/test_fusion.py tests/core/test_graphs_gpu.py 2>&1 | tee "$OUT/pytest_fuse.log" | tail -8
fuse_rc=${PIPESTATUS[0]}
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/core/test_sparse_decode_attention_kernel.py \
    tests/core/test_decode_step.py 2>&1 | tee "$OUT/pytest_attn.log" | tail -8
attn_rc=${PIPESTATUS[0]}
merge=True; [ "$attn_rc" = 0 ] || merge=False
echo "fused-op tests rc=$fuse_rc  attention tests rc=$attn_rc  -> FUSED_MERGE=$merge"
timeout "${BENCH_TIMEOUT:-330}" python3 -c "
import sys
import importlib
importlib.import_module('kvcomp.ops.sparse_decode_attention.kernels').FUSED_MERGE = $merge
from kvcomp.cli import main
sys.exit(main(['bench', 'e2e', '--fuse', 'all', '--json', '$OUT/e2e.json'] + sys.argv[1:]))
" "$@" 2>&1 | tee "$OUT/bench.log"
echo "bench rc=${PIPESTATUS[0]}"
