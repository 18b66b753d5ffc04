"""Experiment (issue 8): hash weights fitted to the data, measured as kvcomp selects.

SmolLM2-135M, CTX-token documents (default 4096) cut from the essays (``split_essays(seed=0,
n_train=12)``): weights are fitted on training documents only; the measurement uses held-out
documents, their last WINDOW positions as decode steps (prefill = the rest, whose mean key is
the ``centered_norm`` mu), chunk 16, 128 bits, must-select (0, -2, -1), layers 2-29 (the first two
stay dense). Every selection follows kvcomp's rule: query code ``sign(q_g W)``, key code
``sign((k - mu) W)`` (``centered_norm``) or ``sign(k W)`` (``hamming``), token score
``sum_g (BITS - 2 Ham)`` (times ``||k - mu||`` for ``centered_norm``), block score = the block's
max token score, top-k with ties to the lower block; the oracle takes the blocks of most true
attention mass (group mean of the softmax). Reported: captured attention mass per budget (mean
over sparse layers and kv-heads per position, then mean and s.e. over positions) and the share
of the random/hamming -> oracle gap closed (s.e. from the paired per-position differences).

Variants (W per (layer, kv-head), [D, BITS]):
  random          kvcomp's seeded orthogonal projections (``HashWeights.random``, seed 0)
  exact           no hash: the score itself, sum_g q_g . (k - mu) (the limit of infinite bits)
  qcov / kcov     W = Sigma^{1/2} G: Gaussian directions shaped by the covariance of the group's
                  queries / of the centred keys on training text
  qcov-orth       W = U diag(sqrt lambda) R (R [D, BITS] stacked random orthogonal blocks)
  block-rank      kvcomp.training.block_rank.fit_block_rank (what ``kvcomp train-hash
                  --objective block-rank`` runs) on the training documents (--train-ctx lengths)
  --weights NAME=PATH   any HashWeights file, e.g. a train-hash output
  exact, angle    no hash: sum_g q_g . (k - mu), and centered_norm's infinite-bit limit
                  ||k - mu|| sum_g (1 - 2 angle_g / pi)

Run (CPU, one thread): OMP_NUM_THREADS=1 python tools/experiments/fit_hash.py [--variants ...]
(~2 min per fitted variant's evaluation; block-rank fitting ~30 s per layer). Captured q/k are
cached under /tmp/fit_hash_cache (a few GB). Results: docs/results/smollm2_fit_hash.txt.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

CTX, WINDOW, CHUNK, BITS, MUST = 4096, 1024, 16, 128, (0, -2, -1)
BUDGETS = (0.05, 0.1, 0.2)
FIRST_SPARSE = 2
SIN_TEMPS: tuple[float, ...] = ()  # --lse-temps
CACHE = Path("/tmp/fit_hash_cache")


# ----------------------------------------------------------------------------- capture
def capture_docs(split: str, n_docs: int, ctx: int) -> list[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """[{layer: (q [Hq, T, D], k [Hkv, T, D])}] for the first n_docs documents of the split."""
    path = CACHE / f"{split}_{n_docs}_{ctx}.pt"
    if path.exists():
        return torch.load(path)
    from kvcomp.eval.loading import load_model, load_texts, make_documents
    from kvcomp.training import capture_qk

    model, tok = load_model("smollm2")
    docs = make_documents(load_texts([f"essays:{split}"]), tok, ctx, n_docs)
    out = []
    for d in docs:
        cap = capture_qk(model, d)
        out.append({i: (c.q.clone(), c.k.clone()) for i, c in cap.items()})
    CACHE.mkdir(exist_ok=True)
    torch.save(out, path)
    return out


# ----------------------------------------------------------------------------- selection
def oracle_mass(q: torch.Tensor, k: torch.Tensor, t0: int) -> torch.Tensor:
    """q [Hq, N, D] at positions t0..t0+N-1, k [Hkv, T, D] -> [Hkv, N, NB] block mass (group mean)."""
    Hq, N, D = q.shape
    Hkv, T, _ = k.shape
    G = Hq // Hkv
    s = torch.einsum("hnd,hld->hnl", q.reshape(Hkv, G * N, D), k).view(Hkv * G, N, T) * D**-0.5
    t = torch.arange(t0, t0 + N).view(1, N, 1)
    s = s.masked_fill(torch.arange(T).view(1, 1, T) > t, -math.inf)
    p = torch.softmax(s, -1).view(Hkv, G, N, T).mean(1)
    nb = -(-T // CHUNK)
    p = torch.nn.functional.pad(p, (0, nb * CHUNK - T))
    return p.view(Hkv, N, nb, CHUNK).sum(-1)


def block_max(scores: torch.Tensor, t0: int) -> torch.Tensor:
    """token scores [Hkv, N, T] -> [Hkv, N, NB] block max over causal tokens."""
    Hkv, N, T = scores.shape
    t = torch.arange(t0, t0 + N).view(1, N, 1)
    sc = scores.masked_fill(torch.arange(T).view(1, 1, T) > t, -math.inf)
    nb = -(-T // CHUNK)
    sc = torch.nn.functional.pad(sc, (0, nb * CHUNK - T), value=-math.inf)
    return sc.view(Hkv, N, nb, CHUNK).amax(-1)


def block_lse(scores: torch.Tensor, t0: int) -> torch.Tensor:
    """token log-weights [Hkv, N, T] -> [Hkv, N, NB] block log-sum-exp over causal tokens: the
    log of the block's (unnormalised) attention mass when the weights are calibrated logits."""
    Hkv, N, T = scores.shape
    t = torch.arange(t0, t0 + N).view(1, N, 1)
    sc = scores.masked_fill(torch.arange(T).view(1, 1, T) > t, -math.inf)
    nb = -(-T // CHUNK)
    sc = torch.nn.functional.pad(sc, (0, nb * CHUNK - T), value=-math.inf)
    return torch.logsumexp(sc.view(Hkv, N, nb, CHUNK).double(), -1).float()


def query_norm(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """q [Hq, N, D] -> [Hkv, N, 1]: the mean query norm of each kv-head's group."""
    Hq, N, D = q.shape
    return q.norm(dim=-1).view(hkv, Hq // hkv, N).mean(1).unsqueeze(-1)


def captured(bscores: torch.Tensor, mass: torch.Tensor, t0: int) -> dict[float, torch.Tensor]:
    """Block scores and true mass [Hkv, N, NB] -> {budget: [N] captured mass (mean over Hkv)}."""
    Hkv, N, nb = mass.shape
    nbt = (torch.arange(t0, t0 + N) + CHUNK) // CHUNK  # blocks visible at each position
    real = torch.arange(nb).view(1, nb) < nbt.view(N, 1)
    sc = bscores.to(torch.float64).masked_fill(~real, -math.inf)
    for m in MUST:
        idx = torch.full((N,), m) if m >= 0 else nbt + m
        sc[:, torch.arange(N), idx] = math.inf
    order = torch.sort(sc, dim=-1, descending=True, stable=True).indices
    cum = mass.gather(-1, order).cumsum(-1)  # [Hkv, N, NB]
    out = {}
    for r in BUDGETS:
        kb = torch.ceil(r * nbt.double()).long().clamp(min=len(set(MUST)))
        out[r] = cum.gather(-1, (kb - 1).view(1, N, 1).expand(Hkv, N, 1)).squeeze(-1).mean(0)
    return out


def hash_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
    """kvcomp's token scores: q [Hq, N, D], k [Hkv, T, D], w [Hkv, D, BITS], mu [Hkv, D] or None
    (hamming) -> float [Hkv, N, T]."""
    Hq, N, D = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    sq = (torch.einsum("hnd,hdb->hnb", q.reshape(Hkv, G * N, D), w) > 0).float() * 2 - 1
    sq = sq.view(Hkv, G, N, -1).sum(1)
    kc = k if mu is None else k - mu.unsqueeze(1)
    sk = (torch.einsum("hld,hdb->hlb", kc, w) > 0).float() * 2 - 1
    sc = torch.einsum("hnb,hlb->hnl", sq, sk)
    if mu is None:
        return sc
    return sc * kc.norm(dim=-1).half().float().unsqueeze(1)


def exact_scores(q: torch.Tensor, k: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    Hq, N, D = q.shape
    Hkv = k.shape[0]
    return torch.einsum("hnd,hld->hnl", q.reshape(Hkv, Hq // Hkv, N, D).sum(1), k - mu.unsqueeze(1))


def angle_scores(q: torch.Tensor, k: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """centered_norm's expectation (infinite random bits): ||k - mu|| sum_g (1 - 2 angle_g / pi)."""
    Hq, N, D = q.shape
    Hkv = k.shape[0]
    kc = k - mu.unsqueeze(1)
    qn = torch.nn.functional.normalize(q.reshape(Hkv, Hq // Hkv * N, D), dim=-1)
    cos = torch.einsum("hnd,hld->hnl", qn, torch.nn.functional.normalize(kc, dim=-1))
    lin = (1 - 2 * torch.arccos(cos.clamp(-1, 1)) / math.pi).view(Hkv, Hq // Hkv, N, -1).sum(1)
    return lin * kc.norm(dim=-1).unsqueeze(1)


# ----------------------------------------------------------------------------- fitted weights
def _gauss(n: int, d: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, bits, generator=g, dtype=torch.float64)


def _sqrtm(c: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    ev, U = torch.linalg.eigh(c)
    return U @ torch.diag_embed(ev.clamp(min=1e-8 * ev.max()) ** power) @ U.transpose(-1, -2)


def group_stats(train, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query covariance [Hkv, D, D] of the group's queries, centred-key covariance [Hkv, D, D])
    over the second half of every training document (float64)."""
    qs, ks = [], []
    for doc in train:
        q, k = doc[layer]
        Hq, T, D = q.shape
        Hkv = k.shape[0]
        qs.append(q[:, T // 2:].reshape(Hkv, -1, D))  # heads of a group are consecutive
        ks.append(k[:, T // 2:] - k[:, : T // 2].mean(1, keepdim=True))
    q = torch.cat(qs, 1).double()
    k = torch.cat(ks, 1).double()
    qc = q - q.mean(1, keepdim=True)
    return qc.transpose(1, 2) @ qc / q.shape[1], k.transpose(1, 2) @ k / k.shape[1]


def fitted_weights(name: str, train, layer: int, hkv: int, d: int, seed: int = 0) -> torch.Tensor:
    from kvcomp.hashing import orthogonal_projection

    if name == "random":
        return orthogonal_projection(hkv, d, BITS, seed=seed, layer=layer)
    cq, ck = group_stats(train, layer)
    if name == "qcov":
        w = _sqrtm(cq) @ _gauss(hkv, d, BITS, seed * 1000 + layer)
    elif name == "kcov":
        w = _sqrtm(ck) @ _gauss(hkv, d, BITS, seed * 1000 + layer)
    elif name == "qcov-orth":
        w = _sqrtm(cq) @ orthogonal_projection(hkv, d, BITS, seed=seed, layer=layer).double()
    elif name == "kcov-orth":
        w = _sqrtm(ck) @ orthogonal_projection(hkv, d, BITS, seed=seed, layer=layer).double()
    elif name == "qkcov-orth":  # the geometric mean of the two metrics' square roots
        w = _sqrtm(cq, 0.25) @ _sqrtm(ck, 0.25) @ orthogonal_projection(hkv, d, BITS, seed=seed,
                                                                           layer=layer).double()
    else:
        raise ValueError(f"unknown variant {name!r}")
    return (w / w.norm(dim=1, keepdim=True)).float()


# ----------------------------------------------------------------------------- block-rank
def training_groups(train, layer: int, n_queries: int, seed: int = 0):
    """[GroupSet] per kv-head of ``layer`` from the captured training documents (query positions
    drawn as ``kvcomp.training.collect.collect_groups`` draws them)."""
    from kvcomp.training.block_rank import GroupSet
    from kvcomp.training.collect import sample_positions

    Hkv = train[0][layer][1].shape[0]
    groups = [GroupSet() for _ in range(Hkv)]
    for d, doc in enumerate(train):
        q, k = doc[layer]
        G = q.shape[0] // Hkv
        t = sample_positions(k.shape[1], n_queries, torch.Generator().manual_seed(seed * 1_000_003 + d))
        for h in range(Hkv):
            groups[h].q.append(q[h * G : (h + 1) * G, t].contiguous())
            groups[h].k.append(k[h].contiguous())
            groups[h].t.append(t)
    return groups


def block_rank(train, layer: int, w0: torch.Tensor, *, steps: int, n_queries: int, lr: float,
               beta: float, tau: float, seed: int = 0) -> torch.Tensor:
    """kvcomp.training.block_rank.fit_block_rank on the captured training documents."""
    from kvcomp.training.block_rank import fit_block_rank

    groups = training_groups(train, layer, n_queries, seed)
    w, _ = fit_block_rank(groups, w0, steps=steps, lr=lr, beta=beta, tau=tau, chunk=CHUNK)
    return w


# ----------------------------------------------------------------------------- main
def evaluate(held, weights: dict[str, dict[int, torch.Tensor]], window: int, per_layer=None,
             scores=("hamming", "centered_norm"), lse=()):
    """{variant/score: {budget: [positions] captured mass}} over the held-out documents (token
    scores ``scores`` for every variant but "random", which always has both);
    ``per_layer`` (a dict) also receives {(variant/score, budget): {layer: [docs] mean mass}}."""
    res: dict[str, dict[float, list]] = {}
    n_layers = len(held[0])
    for doc in held:
        per: dict[str, dict[float, torch.Tensor]] = {}
        for layer in range(FIRST_SPARSE, n_layers):
            q, k = doc[layer]
            T = k.shape[1]
            t0 = T - window
            qw = q[:, t0:]
            mu = k[:, :t0].mean(1)
            mass = oracle_mass(qw, k, t0)
            runs = {"oracle": mass, "exact": block_max(exact_scores(qw, k, mu), t0),
                    "angle": block_max(angle_scores(qw, k, mu), t0)}
            Hkv, D = k.shape[0], k.shape[-1]
            G = qw.shape[0] // Hkv
            if lse:  # block = log-sum-exp of calibrated token logits instead of the max
                runs["exact-lse"] = block_lse(exact_scores(qw, k, mu) / (G * math.sqrt(D)), t0)
            for name, ws in weights.items():
                w = ws[layer]
                if name == "random" or "hamming" in scores:
                    runs[f"{name}/hamming"] = block_max(hash_scores(qw, k, w, None), t0)
                if name == "random" or "centered_norm" in scores:
                    cn = hash_scores(qw, k, w, mu)
                    runs[f"{name}/centered_norm"] = block_max(cn, t0)
                    # logit estimate: ||q|| ||k - mu|| cos, cos ~ (BITS - 2 Ham) / BITS, x alpha
                    nbits = w.shape[-1]  # the weights' own width (--bits for random)
                    base = cn * query_norm(qw, Hkv) / (nbits * G * math.sqrt(D))
                    for a in lse:
                        runs[f"{name}/centered_norm-lse{a:g}"] = block_lse(base * a, t0)
                    if lse:  # the SimHash inversion: cos(angle) = sin(pi/2 (BITS - 2 Ham) / BITS)
                        kn = (k - mu.unsqueeze(1)).norm(dim=-1).half().float().unsqueeze(1)
                        sin = torch.sin(math.pi / 2 * cn / kn.clamp(min=1e-30) / (nbits * G))
                        logit = sin * kn * query_norm(qw, Hkv) / math.sqrt(D)
                        runs[f"{name}/centered_norm-lse-sin"] = block_lse(logit, t0)
                        for beta in SIN_TEMPS:  # a temperature on the estimated logits
                            runs[f"{name}/centered_norm-lse-sin-x{beta:g}"] = block_lse(logit * beta, t0)
            for key, bs in runs.items():
                for r, v in captured(bs, mass, t0).items():
                    if per_layer is not None:
                        per_layer.setdefault((key, r), {}).setdefault(layer, []).append(float(v.mean()))
                    acc = per.setdefault(key, {}).setdefault(r, torch.zeros(window, dtype=torch.float64))
                    acc += v / (n_layers - FIRST_SPARSE)
        for key, d in per.items():
            for r, v in d.items():
                res.setdefault(key, {}).setdefault(r, []).append(v)
    return {k: {r: torch.cat(v) for r, v in d.items()} for k, d in res.items()}


def table(res) -> str:
    base, orc = res["random/hamming"], res["oracle"]
    n = len(base[BUDGETS[0]])
    lines = [f"| selection ({n} positions) | " + " | ".join(f"mass @ {r:g}" for r in BUDGETS)
             + " | " + " | ".join(f"gap closed @ {r:g}" for r in BUDGETS) + " |",
             "|---" * (1 + 2 * len(BUDGETS)) + "|"]
    for key, d in res.items():
        cells = [f"{d[r].mean():.4f} ± {d[r].std() / math.sqrt(n):.4f}" for r in BUDGETS]
        for r in BUDGETS:
            gap = (orc[r] - base[r]).mean()
            diff = d[r] - base[r]
            cells.append(f"{diff.mean() / gap:+.1%} ± {diff.std() / math.sqrt(n) / gap:.1%}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=CTX)
    ap.add_argument("--bits", type=int, default=128, help="code width of the random and fitted variants")
    ap.add_argument("--window", type=int, default=WINDOW)
    ap.add_argument("--held-docs", type=int, default=4)
    ap.add_argument("--train-docs", type=int, default=4)
    ap.add_argument("--train-ctx", type=int, nargs="*", default=None,
                    help="training document lengths (default --ctx; several: documents of each)")
    ap.add_argument("--variants", nargs="+", default=["random", "qcov", "kcov", "qcov-orth",
                                                      "kcov-orth", "qkcov-orth"])
    ap.add_argument("--weights", nargs="*", default=[], metavar="NAME=PATH",
                    help="also measure these HashWeights files (e.g. train-hash outputs)")
    ap.add_argument("--rank-init", default="random", help="init of block-rank")
    ap.add_argument("--rank-steps", type=int, default=400)
    ap.add_argument("--rank-queries", type=int, default=256)
    ap.add_argument("--rank-lr", type=float, default=0.01)
    ap.add_argument("--rank-beta", type=float, default=3.0)
    ap.add_argument("--rank-tau", type=float, default=0.1)
    ap.add_argument("--per-layer", type=float, default=None, metavar="BUDGET",
                    help="also print each layer's captured mass at this budget")
    ap.add_argument("--scores", nargs="+", default=["hamming", "centered_norm"],
                    choices=("hamming", "centered_norm"),
                    help="token scores measured for the variants other than random")
    ap.add_argument("--lse", type=float, nargs="*", default=[], metavar="ALPHA",
                    help="also rank blocks by the log-sum-exp of calibrated token logits: exact "
                         "and centered_norm scaled by ALPHA (each value one run)")
    ap.add_argument("--lse-temps", type=float, nargs="*", default=[],
                    help="with --lse: also the sine estimate's logits times each of these")
    ap.add_argument("--split", default="heldout", choices=("heldout", "train"),
                    help="measure on held-out (default) or training documents (for tuning)")
    ap.add_argument("--layers", type=int, nargs="*", default=None,
                    help="sparse layers to measure (default all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    global SIN_TEMPS, BITS
    SIN_TEMPS = tuple(args.lse_temps)
    BITS = args.bits
    held = capture_docs(args.split, args.held_docs, args.ctx)
    fitted = [v for v in args.variants if v != "random"]
    train = [doc for c in (args.train_ctx or [args.ctx]) for doc in capture_docs("train", args.train_docs, c)] \
        if fitted else []  # random weights and --weights files need no training documents
    n_layers = len(held[0])
    Hkv, _, D = held[0][0][1].shape
    if args.layers:  # measure a subset: keep only those layers (and the dense ones' slots empty)
        global FIRST_SPARSE
        keep = sorted(args.layers)
        held = [{i: d[layer] for i, layer in enumerate(keep)} for d in held]
        train = [{i: d[layer] for i, layer in enumerate(keep)} for d in train]
        layer_ids = keep
        FIRST_SPARSE = 0
    else:
        layer_ids = list(range(n_layers))
    print(f"captured {len(held)} held-out and {len(train)} training documents in {time.time() - t0:.0f}s")
    weights: dict[str, dict[int, torch.Tensor]] = {}
    for v in ["random"] + [v for v in args.variants if v != "random"]:
        t1 = time.time()
        if v == "block-rank":
            weights[v] = {}
            for i, lid in enumerate(layer_ids):
                if i < FIRST_SPARSE:
                    continue
                w0 = fitted_weights(args.rank_init, train, i, Hkv, D) if args.rank_init != "random" \
                    else fitted_weights("random", train, lid, Hkv, D)
                weights[v][i] = block_rank(train, i, w0, steps=args.rank_steps,
                                           n_queries=args.rank_queries, lr=args.rank_lr,
                                           beta=args.rank_beta, tau=args.rank_tau)
        else:
            weights[v] = {i: fitted_weights(v, train, i if v != "random" else lid, Hkv, D)
                          for i, lid in enumerate(layer_ids)}
        print(f"  {v}: {time.time() - t1:.0f}s")
    for spec in args.weights:
        from kvcomp.hashing import HashWeights

        name, path = spec.split("=", 1)
        hw = HashWeights.load(path)
        weights[name] = {i: hw.layer(lid).float() for i, lid in enumerate(layer_ids)}
    per_layer: dict | None = {} if args.per_layer else None
    res = evaluate(held, weights, args.window, per_layer, tuple(args.scores), tuple(args.lse))
    print(table(res))
    if per_layer:
        keys = [k for k in res if k != "oracle"]
        print("\n| layer | " + " | ".join(f"{k} @ {args.per_layer:g}" for k in keys) + " | oracle |")
        print("|---" * (len(keys) + 2) + "|")
        for layer in sorted(per_layer[("oracle", args.per_layer)]):
            vals = [sum(per_layer[(k, args.per_layer)][layer]) / len(held) for k in keys + ["oracle"]]
            print(f"| {layer_ids[layer]} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
