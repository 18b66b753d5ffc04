"""Experiment (issue 8): captured attention mass per query head (not the group mean).

kvcomp selects one set of blocks per kv-head for its group of G query heads; the captured mass
that the eval and the block-rank objective report is the group mean. This prints, per layer, for
random and a given weights file (both ``centered_norm``) and the oracle: the group-mean mass, the
mean over positions of the *smallest* head's captured mass, and the share of (position, head)
pairs that lose more than 30% of their attention. Same simulation and data as ``fit_hash.py``
(held-out documents from its cache, the last WINDOW positions as decode steps).

    OMP_NUM_THREADS=1 python tools/experiments/head_mass.py --ctx 2048 --window 512 --held-docs 8 \
        --weights docs/results/smollm2-blockrank-128.safetensors --budget 0.1
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fit_hash  # noqa: E402
from fit_hash import CHUNK, block_max, capture_docs, hash_scores  # noqa: E402


def head_captured(bscores, q, k, t0, budget):
    """-> [Hq, N] each query head's own captured softmax mass under its group's selection."""
    Hq, N, D = q.shape
    Hkv, T, _ = k.shape
    G = Hq // Hkv
    s = torch.einsum("hgnd,hld->hgnl", q.view(Hkv, G, N, D), k) * D**-0.5
    t = torch.arange(t0, t0 + N).view(1, 1, N, 1)
    s = s.masked_fill(torch.arange(T).view(1, 1, 1, T) > t, -math.inf)
    p = torch.softmax(s, -1)
    nb = -(-T // CHUNK)
    mass = torch.nn.functional.pad(p, (0, nb * CHUNK - T)).view(Hkv, G, N, nb, CHUNK).sum(-1)
    nbt = (torch.arange(t0, t0 + N) + CHUNK) // CHUNK
    real = torch.arange(nb).view(1, nb) < nbt.view(N, 1)
    sc = bscores.to(torch.float64).masked_fill(~real, -math.inf)
    for m in fit_hash.MUST:
        idx = torch.full((N,), m) if m >= 0 else nbt + m
        sc[:, torch.arange(N), idx] = math.inf
    order = torch.sort(sc, dim=-1, descending=True, stable=True).indices  # [Hkv, N, NB]
    kb = torch.ceil(budget * nbt.double()).long().clamp(min=len(set(fit_hash.MUST)))
    keep = torch.arange(nb).view(1, 1, nb) < kb.view(1, N, 1)
    sel = torch.zeros(Hkv, N, nb, dtype=torch.bool).scatter_(-1, order, keep.expand(Hkv, N, nb))
    return (mass * sel.unsqueeze(1)).sum(-1).reshape(Hq, N)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--held-docs", type=int, default=8)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--layers", type=int, nargs="*", default=list(range(2, 30)))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from kvcomp.hashing import HashWeights

    held = capture_docs("heldout", args.held_docs, args.ctx)
    trained = HashWeights.load(args.weights)
    Hkv, _, D = held[0][0][1].shape
    rnd = HashWeights.random(len(held[0]), Hkv, D, trained.bits, seed=0)
    print("| layer | group mean: random / trained / oracle | smallest head: random / trained / oracle "
          "| (position, head) pairs losing > 30%: random / trained / oracle |\n|---|---|---|---|")
    for layer in args.layers:
        acc = {n: [] for n in ("random", "trained", "oracle")}
        for doc in held:
            q, k = doc[layer]
            t0 = k.shape[1] - args.window
            qw = q[:, t0:]
            mu = k[:, :t0].mean(1)
            runs = {"random": block_max(hash_scores(qw, k, rnd.layer(layer), mu), t0),
                    "trained": block_max(hash_scores(qw, k, trained.layer(layer), mu), t0),
                    "oracle": fit_hash.oracle_mass(qw, k, t0)}
            for n, bs in runs.items():
                acc[n].append(head_captured(bs, qw, k, t0, args.budget))
        cells = []
        for stat in (lambda m: m.mean(), lambda m: m.view(Hkv, -1, m.shape[-1]).amin(1).mean(),
                     lambda m: (m < 0.7).double().mean()):
            cells.append(" / ".join(f"{float(stat(torch.cat(acc[n], 1))):.4f}" for n in acc))
        print(f"| {layer} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
