"""Experiment (issue 8): does centring the keys and weighting the Hamming estimate by the vector
norms bring hash selection closer to the oracle?

SmolLM2-135M, one held-out context of CTX tokens (default 4096), the last 256 positions as
decode steps, chunk 16, 128 bits, layers 2+ (the first two stay dense in kvcomp's default).
Captured attention mass of the selected blocks (group-averaged; same block count and the same
must-select blocks 0, -2, -1 for every method):

  oracle                the blocks with the most true attention mass
  random/sum            kvcomp today: sum over the group of (bits - 2 Ham) on raw keys
  random/norm           ||k|| * sum_g ||q_g|| cos(pi Ham_g / bits): the SimHash estimate of q.k
  centered/sum, /norm   keys minus the mean of the first CTX - 256 keys (known after the
                        prefill); q.(k - mu) ranks the keys exactly as q.k does
  trained/..., trained_centered/...   the trained weights in docs/results/

Run (CPU, ~2.5 min): python tools/experiments/center_norm.py [CTX]
"""

from __future__ import annotations

import math
import sys

import torch
from kvcomp.data import load_smollm2, split_essays
from kvcomp.hashing import HashWeights
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NQ, CHUNK, BITS, MUST = 256, 16, 128, (0, -2, -1)
TRAINED = "docs/results/smollm2-hata-128.safetensors"


def capture_qk(ctx: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (q [Hq, NQ, D] of the last NQ positions, k [Hkv, ctx, D])}, post-RoPE, fp32."""
    model, tok = load_smollm2()
    cap: dict = {}

    def capture(module, query, key, value, attention_mask, **kw):
        cap[module.layer_idx] = (query[0, :, -NQ:].float().clone(), key[0].float().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("capture_qk", capture)
    model.set_attn_implementation("capture_qk")
    _, held = split_essays(seed=0, n_train=12)
    ids: list[int] = []
    for _, text in held:
        ids += tok(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= ctx:
            break
    with torch.no_grad():
        model(torch.tensor(ids[:ctx]).view(1, -1))
    return cap


def sign(x: torch.Tensor) -> torch.Tensor:
    return (x > 0).float() * 2 - 1


def captured_mass(block_scores, block_mass, valid, must, kb) -> float:
    """Mass of the top-kb blocks by block_scores [Hkv, NQ, NB] (must-select first)."""
    sc = block_scores.masked_fill(~valid, -math.inf).masked_fill(must, math.inf)
    rank = sc.argsort(-1, descending=True).argsort(-1)
    return (block_mass * (rank < kb.view(1, -1, 1))).sum(-1).mean().item()


def token_scores(q, keys, w, G: int, mode: str) -> torch.Tensor:
    """[Hkv, NQ, L] hash scores of the keys for the NQ queries (sum or norm-weighted)."""
    Hkv, L, _ = keys.shape
    sk = sign(torch.einsum("hld,hdb->hlb", keys, w))
    sq = sign(torch.einsum("hnd,hdb->hnb", q, w.repeat_interleave(G, 0))).view(Hkv, G, NQ, BITS)
    agree = torch.einsum("hgnb,hlb->hgnl", sq, sk)  # bits - 2 Ham per query head
    if mode == "sum":
        return agree.sum(1)
    cos = torch.cos(math.pi * (BITS - agree) / (2 * BITS))
    qn = q.norm(dim=-1).view(Hkv, G, NQ, 1)
    return (qn * cos).sum(1) * keys.norm(dim=-1).view(Hkv, 1, L)


def main(ctx: int) -> None:
    cap = capture_qk(ctx)
    n_layers = len(cap)
    Hkv, L, D = cap[0][1].shape
    G = cap[0][0].shape[0] // Hkv
    rand = HashWeights.random(n_layers, Hkv, D, BITS, seed=0)
    trained = HashWeights.load(TRAINED)
    t_pos = torch.arange(L - NQ, L)
    nb = -(-L // CHUNK)
    causal = torch.arange(L).view(1, 1, L) <= t_pos.view(1, NQ, 1)
    nbt = (t_pos + CHUNK) // CHUNK  # blocks visible at each position
    valid = torch.arange(nb).view(1, -1) < nbt.view(-1, 1)
    must = torch.zeros(NQ, nb, dtype=torch.bool)
    for m in MUST:
        must[torch.arange(NQ), m if m >= 0 else nbt + m] = True
    res: dict = {}
    for layer in range(2, n_layers):
        q, k = cap[layer]
        s = torch.einsum("hnd,hld->hnl", q, k.repeat_interleave(G, 0)) * D**-0.5
        p = torch.softmax(s.masked_fill(~causal, -math.inf), -1)
        mass = torch.nn.functional.pad(p, (0, nb * CHUNK - L)).view(-1, NQ, nb, CHUNK).sum(-1)
        mass = mass.view(Hkv, G, NQ, nb).mean(1)
        centered = k - k[:, : L - NQ].mean(1, keepdim=True)
        keysets = {"random": (k, rand), "centered": (centered, rand), "trained": (k, trained),
                   "trained_centered": (centered, trained)}
        for ratio in (0.05, 0.1, 0.2):
            kb = torch.ceil(ratio * nbt.float()).long().clamp(min=len(MUST))
            res.setdefault(("oracle", ratio), []).append(captured_mass(mass, mass, valid, must, kb))
            for name, (keys, hw) in keysets.items():
                w = hw.layer(layer).float()
                for mode in ("sum", "norm"):
                    ts = token_scores(q, keys, w, G, mode).masked_fill(~causal, -1e9)
                    ts = torch.nn.functional.pad(ts, (0, nb * CHUNK - L), value=-1e9)
                    bs = ts.view(Hkv, NQ, nb, CHUNK).amax(-1)
                    res.setdefault((f"{name}/{mode}", ratio), []).append(
                        captured_mass(bs, mass, valid, must, kb))
    avg = {key: sum(v) / len(v) for key, v in res.items()}
    names = [n for n in dict.fromkeys(k for k, _ in avg) if n not in ("oracle", "random/sum")]
    print(f"| method (ctx {L}, chunk {CHUNK}, {BITS} bits) | 5% | 10% | 20% | gap closed 5 / 10 / 20% |")
    print("|---|---|---|---|---|")
    for name in ["oracle", "random/sum"] + names:
        vals = [avg[(name, r)] for r in (0.05, 0.1, 0.2)]
        gaps = [(avg[(name, r)] - avg[("random/sum", r)])
                / (avg[("oracle", r)] - avg[("random/sum", r)]) for r in (0.05, 0.1, 0.2)]
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + " | "
              + " / ".join(f"{g:+.0%}" for g in gaps) + " |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
