"""Issue 8 through the ops: centred key codes + norm-weighted scores, measured with the public
ops instead of the simulation of ``center_norm.py`` (same setting, same captured-mass metric).

SmolLM2-135M, one held-out context of CTX tokens (default 4096), the last 256 positions as
decode steps (one ragged batch: position t is a sequence of length t + 1), chunk 16, 128 random
bits (seed 0), layers 2+, must-select (0, -2, -1), equal block counts ceil(r * blocks) for every
method. Every selection is ``kvcomp.ops.hamming_topk(backend="reference")``; the oracle is the
same selection rule applied to the true attention mass per block (``select_blocks_ref``).

  today         hash_encode(k, W), hamming_topk(...): kvcomp's selection now
  knorm         raw codes, k_scale = key_norms(k) = ||k||
  centred       hash_encode(k, W, bias=hash_bias(mu, W)), no weights
  centred+knorm centred codes and k_scale = key_norms(k, mu) = ||k - mu||

mu = key_mean(k, CTX - 256): the mean key of the prefix per kv-head (known after the prefill).

Run (CPU, a few minutes): python tools/experiments/knorm_ops.py [CTX] [--json OUT]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from kvcomp.hashing import HashWeights
from kvcomp.ops import hamming_topk, hash_bias, hash_encode, key_mean, key_norms
from kvcomp.ops.hamming_topk.reference import select_blocks_ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
from center_norm import BITS, CHUNK, MUST, NQ, capture_qk  # noqa: E402

RATIOS = (0.05, 0.1, 0.2)
METHODS = ("today", "knorm", "centred", "centred+knorm")


def selected_mass(idx: torch.Tensor, mass: torch.Tensor) -> float:
    """idx [NQ, Hkv, K] (-1 padding), mass [NQ, Hkv, NB] -> mean captured mass."""
    got = mass.gather(2, idx.clamp(min=0).long()) * (idx >= 0)
    return got.sum(-1).mean().item()


def layer_results(q, k, w, G: int) -> dict:
    """{(method, ratio): captured mass} for one layer. q [Hq, NQ, D], k [Hkv, L, D], w [Hkv, D, BITS]."""
    Hkv, L, D = k.shape
    nb = -(-L // CHUNK)
    t_pos = torch.arange(L - NQ, L)
    lens = t_pos + 1  # [NQ] position t attends to tokens 0..t
    # true attention mass per block, averaged over the group's query heads
    s = torch.einsum("hnd,hld->hnl", q, k.repeat_interleave(G, 0)) * D**-0.5
    causal = torch.arange(L).view(1, 1, L) <= t_pos.view(1, NQ, 1)
    p = torch.softmax(s.masked_fill(~causal, -math.inf), -1)
    mass = torch.nn.functional.pad(p, (0, nb * CHUNK - L)).view(-1, NQ, nb, CHUNK).sum(-1)
    mass = mass.view(Hkv, G, NQ, nb).mean(1).permute(1, 0, 2).contiguous()  # [NQ, Hkv, NB]

    q_codes = hash_encode(q.transpose(0, 1), w.repeat_interleave(G, 0))  # [NQ, Hq, W]
    k1 = k.unsqueeze(0)  # [1, Hkv, L, D]
    mu = key_mean(k1, torch.tensor([L - NQ]))[0]  # [Hkv, D]
    expand = (NQ, -1, -1, -1)
    raw = hash_encode(k1, w).expand(*expand)  # [NQ, Hkv, L, W], batch stride 0
    centred = hash_encode(k1, w, bias=hash_bias(mu, w)).expand(*expand)
    norm_raw = key_norms(k1).expand(NQ, -1, -1)  # [NQ, Hkv, L] fp16
    norm_c = key_norms(k1, mu).expand(NQ, -1, -1)
    setups = {"today": (raw, None), "knorm": (raw, norm_raw), "centred": (centred, None),
              "centred+knorm": (centred, norm_c)}
    out = {}
    for r in RATIOS:
        kb = torch.ceil(r * ((lens + CHUNK - 1) // CHUNK).float()).long().clamp(min=len(MUST))
        K = int(kb.max())
        oracle = select_blocks_ref(mass.double(), lens, kb, K, CHUNK, MUST)
        out[("oracle", r)] = selected_mass(oracle, mass)
        for name, (codes, scale) in setups.items():
            idx = hamming_topk(q_codes, codes, lens, k_blocks=kb, max_blocks=K, chunk_size=CHUNK,
                               must_select=MUST, k_scale=scale, backend="reference")
            out[(name, r)] = selected_mass(idx, mass)
    return out


def main(ctx: int, json_out: str | None) -> None:
    torch.manual_seed(0)
    cap = capture_qk(ctx)
    n_layers = len(cap)
    Hkv, L, D = cap[0][1].shape
    G = cap[0][0].shape[0] // Hkv
    rand = HashWeights.random(n_layers, Hkv, D, BITS, seed=0)
    res: dict = {}
    for layer in range(2, n_layers):
        q, k = cap[layer]
        with torch.no_grad():
            for key, v in layer_results(q, k, rand.layer(layer).float(), G).items():
                res.setdefault(key, []).append(v)
        print(f"layer {layer} done", file=sys.stderr)
    avg = {key: sum(v) / len(v) for key, v in res.items()}
    head = f"| selection (ops; ctx {L}, chunk {CHUNK}, {BITS} random bits) | 5% | 10% | 20% |"
    print(head + " gap closed 5 / 10 / 20% |")
    print("|---|---|---|---|---|")
    rows = {}
    for name in ("oracle",) + METHODS:
        vals = [avg[(name, r)] for r in RATIOS]
        gaps = [(avg[(name, r)] - avg[("today", r)]) / (avg[("oracle", r)] - avg[("today", r)])
                for r in RATIOS]
        rows[name] = {"mass": vals, "gap_closed": gaps}
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + " | "
              + " / ".join(f"{g:+.0%}" for g in gaps) + " |")
    if json_out:
        Path(json_out).write_text(json.dumps(
            {"ctx": L, "chunk": CHUNK, "bits": BITS, "positions": NQ, "layers": n_layers - 2,
             "ratios": RATIOS, "must_select": MUST, "results": rows}, indent=1))


if __name__ == "__main__":
    args = sys.argv[1:]
    out = None
    if "--json" in args:
        i = args.index("--json")
        out = args[i + 1]
        del args[i:i + 2]
    main(int(args[0]) if args else 4096, out)
