"""Experiment (issue 8): RoPE-equivariant hash weights W = S R for SmolLM2, fitted on training
essays and written as HashWeights files (measure them with ``fit_hash.py --weights NAME=PATH``).

R [D, BITS] is kvcomp's seeded random orthogonal projection (``HashWeights.random``, seed 0);
S [D, D] commutes with every RoPE rotation. HF llama's ``rotate_half`` rotates the planes
(i, i + D/2), i < D/2, plane i by angle ``pos * theta^(-2i/D)``; all frequencies differ, so S
acts on each plane alone as a scaled rotation a I + b J. Variants:

  scale      S = diag(s_f) per plane (D/2 numbers per (layer, kv-head)), fitted with the
             block-rank loss (``kvcomp.training.block_rank``: the relaxed centered_norm block
             score through the fixed R, ListNet against the true block mass), Adam on log s
  scale-rr   the same, but R redrawn (seeded Haar) at every step: s is fitted for the hash
             family, not for one draw of R, and then applied to kvcomp's R
  rot        S = s_f (cos phi_f I + sin phi_f J): scale and a learned per-plane rotation
  slow-free  scale on the planes i < --slow-from and a free matrix on the dims of the planes
             i >= --slow-from (both halves), whose RoPE frequency turns them by less than about
             1 rad over 8K positions (SmolLM2, theta 1e5: i >= 26): nearly equivariant there
  corr       closed form (no gradient on the loss): u_f = s_f^2 maximises the correlation of
             the noisy hash estimate of cos(S q, S k) with the true q . (k - mu), using per-band
             statistics a_f = E||q_f||^2, b_f = E||(k - mu)_f||^2 and the covariance over keys C
             of x_f = q_f . (k - mu)_f:  corr^2 = (u'C1)^2 / (1'C1 (u'Cu + sigma^2 u'a u'b)),
             sigma^2 = the hash's noise in cos units (about (pi/2)^2 / BITS); solved by Adam on
             32 numbers per head (milliseconds)
  var        closed form: u_f = sqrt(C_ff / (a_f b_f)) (the band's spread over keys per unit of
             the energy it adds to the two norms), normalised to mean 1

    OMP_NUM_THREADS=1 python tools/experiments/rope_scale.py --variant scale --train-ctx 2048 4096 8192 \
        --out /tmp/rope_scale/scale_248.safetensors

Training documents come from ``fit_hash.py``'s cache (``/tmp/fit_hash_cache/train_4_{ctx}.pt``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fit_hash import BITS, CHUNK, FIRST_SPARSE, capture_docs  # noqa: E402
from fit_hash import training_groups as _groups  # noqa: E402


def plane_full(x: torch.Tensor) -> torch.Tensor:
    """[..., D/2] per-plane values -> [..., D] (dims i and i + D/2 share plane i)."""
    return torch.cat([x, x], -1)


def rope_s_matrix(scale: torch.Tensor, phi: torch.Tensor | None = None) -> torch.Tensor:
    """scale [P, F] (F = D/2), phi [P, F] or None -> S [P, D, D] acting on row vectors
    (x S): per plane s (cos phi I + sin phi J), J the rotate_half rotation. Commutes with RoPE."""
    P, F = scale.shape
    c = scale * (torch.cos(phi) if phi is not None else 1.0)
    s = scale * torch.sin(phi) if phi is not None else torch.zeros_like(scale)
    S = torch.zeros(P, 2 * F, 2 * F, dtype=scale.dtype)
    i = torch.arange(F)
    S[:, i, i] = c
    S[:, i + F, i + F] = c
    # rotate_half: x -> (-x2, x1); as x @ J: J[i + F, i] = -1, J[i, i + F] = 1
    S[:, i + F, i] = -s
    S[:, i, i + F] = s
    return S


def max_head_targets(q, k, t, chunk):
    """As ``block_targets`` but each block's target is the largest mass any head of the group
    gives it (not the group mean), renormalised over the ranked blocks."""
    from kvcomp.training.block_rank import MUST_SELECT

    P, G, n, D = q.shape
    T = k.shape[1]
    nb = -(-T // chunk)
    s = torch.einsum("pgnd,ptd->pgnt", q, k) * D**-0.5
    s = s.masked_fill(torch.arange(T).view(1, 1, 1, T) > t.view(1, 1, n, 1), -math.inf)
    p = torch.softmax(s, -1)
    mass = torch.nn.functional.pad(p, (0, nb * chunk - T)).view(P, G, n, nb, chunk).sum(-1).amax(1)
    nbt = (t + chunk) // chunk
    ranked = torch.arange(nb).view(1, nb) < nbt.view(n, 1)
    for m in MUST_SELECT:
        ranked[torch.arange(n), torch.full_like(t, m) if m >= 0 else (nbt + m).clamp(min=0)] = False
    target = mass * ranked
    return target / target.sum(-1, keepdim=True).clamp(min=1e-12), ranked


def fit_gradient(groups, R: torch.Tensor, *, steps: int, lr: float, beta: float, tau: float,
                 rot: bool, redraw: bool, layer: int, slow_from: int | None = None,
                 target_max: bool = False) -> torch.Tensor:
    """Block-rank loss on S (per-plane log scale, optional rotation). R [P, D, B]. -> S [P, D, D]."""
    from kvcomp.hashing import haar_orthogonal
    from kvcomp.training.block_rank import block_rank_loss, block_targets, relaxed_block_scores

    P, D, B = R.shape
    F = D // 2
    data = []
    for d in range(groups[0].num_docs):
        q = torch.stack([gs.q[d] for gs in groups])
        k = torch.stack([gs.k[d] for gs in groups])
        t = groups[0].t[d]
        kc = k - k[:, : max(1, k.shape[1] // 2)].mean(1, keepdim=True)
        target, ranked = (max_head_targets if target_max else block_targets)(q, k, t, CHUNK)
        data.append((q, kc, t, target, ranked))
    log_s = torch.zeros(P, F, requires_grad=True)
    phi = torch.zeros(P, F, requires_grad=True)
    log_temp = torch.zeros((), requires_grad=True)
    params = [log_s, log_temp] + ([phi] if rot else [])
    if slow_from is not None:
        slow = torch.cat([torch.arange(slow_from, F), torch.arange(slow_from, F) + F])
        A = torch.zeros(P, len(slow), len(slow), requires_grad=True)
        params.append(A)
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        q, kc, t, target, ranked = data[step % len(data)]
        Rs = R
        if redraw:
            seeds = [hash((layer, step, p, b)) & ((1 << 62) - 1) for p in range(P) for b in range(-(-B // D))]
            Rs = haar_orthogonal(seeds, D).view(P, -1, D, D).permute(0, 2, 1, 3).reshape(P, D, -1)[..., :B].float()
        S = rope_s_matrix(log_s.exp(), phi if rot else None)
        if slow_from is not None:
            S = _with_slow(S, slow, A)
        bs = relaxed_block_scores(S @ Rs, q, kc, t, CHUNK, beta, tau)
        loss = block_rank_loss(bs, target, ranked, log_temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        S = rope_s_matrix(log_s.exp(), phi if rot else None)
        return _with_slow(S, slow, A) if slow_from is not None else S


def _with_slow(S: torch.Tensor, slow: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """S [P, D, D] with its rows/columns ``slow`` replaced by diag(S)[slow] + A (free block)."""
    S = S.clone()
    blk = torch.diag_embed(torch.diagonal(S, dim1=-2, dim2=-1)[:, slow]) + A
    S[:, slow.view(-1, 1), slow.view(1, -1)] = blk
    return S


def band_stats(train, layer: int, n_queries: int = 64, n_keys: int = 512, seed: int = 0):
    """Per kv-head band statistics over the training documents (float64): a [P, F] = E||q_f||^2
    (the group's queries, second half), b [P, F] = E||(k - mu)_f||^2, C [P, F, F] = the covariance
    over keys j <= t of x_f = q_f . (k_j - mu)_f, averaged over queries (mu: first-half mean)."""
    Hkv = train[0][layer][1].shape[0]
    a = b = C = None
    n = 0
    for d, doc in enumerate(train):
        q, k = doc[layer]
        Hq, T, D = q.shape
        F = D // 2
        G = Hq // Hkv
        g = torch.Generator().manual_seed(seed * 1_000_003 + d)
        t = (torch.randperm(T - T // 2, generator=g)[:n_queries] + T // 2).sort().values
        kc = (k - k[:, : T // 2].mean(1, keepdim=True)).double()
        j = torch.randperm(T // 2, generator=g)[:n_keys]  # keys all queries see (j < T/2 <= t)
        qq = q[:, t].double().view(Hkv, G * len(t), D)
        kk = kc[:, j]
        x = (qq.view(Hkv, -1, 1, 2, F) * kk.view(Hkv, 1, -1, 2, F)).sum(3)  # [P, nq, nk, F]
        x = x - x.mean(2, keepdim=True)
        c = torch.einsum("pqkf,pqkg->pfg", x, x) / (x.shape[1] * x.shape[2])
        qa = (qq.view(Hkv, -1, 2, F) ** 2).sum(2).mean(1)
        kb = (kc[:, T // 2 :].view(Hkv, -1, 2, F) ** 2).sum(2).mean(1)
        a = qa if a is None else a + qa
        b = kb if b is None else b + kb
        C = c if C is None else C + c
        n += 1
    return a / n, b / n, C / n


def solve_corr(a, b, C, sigma2: float, steps: int = 300) -> torch.Tensor:
    """u = s^2 >= 0 [P, F] maximising (u'C1)^2 / (1'C1 (u'Cu + sigma2 u'a u'b)), from u = 1."""
    P, F = a.shape
    lu = torch.zeros(P, F, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([lu], lr=0.05)
    one = torch.ones(P, F, 1, dtype=torch.float64)
    c1 = (C @ one).squeeze(-1)  # [P, F]
    for _ in range(steps):
        u = lu.exp()
        num = (u * c1).sum(1) ** 2
        uCu = torch.einsum("pf,pfg,pg->p", u, C, u)
        den = c1.sum(1) * (uCu + sigma2 * (u * a).sum(1) * (u * b).sum(1))
        loss = -(num / den).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    u = lu.detach().exp()
    return u / u.mean(1, keepdim=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=("scale", "scale-rr", "rot", "slow-free", "corr", "var"), required=True)
    ap.add_argument("--slow-from", type=int, default=26, help="slow-free: first slow plane")
    ap.add_argument("--target", choices=("mean", "max"), default="mean",
                    help="block target: the group-mean mass (block-rank's) or the max over heads")
    ap.add_argument("--train-ctx", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--train-docs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--queries", type=int, default=64, help="query positions per document")
    ap.add_argument("--beta", type=float, default=3.0)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--sigma2", type=float, default=(math.pi / 2) ** 2 / BITS)
    ap.add_argument("--layers", type=int, nargs="*", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from kvcomp.hashing import HashWeights

    t0 = time.time()
    train = [doc for c in args.train_ctx for doc in capture_docs("train", args.train_docs, c)]
    n_layers = len(train[0])
    Hkv, _, D = train[0][0][1].shape
    print(f"loaded {len(train)} training documents in {time.time() - t0:.0f}s", flush=True)
    hw0 = HashWeights.random(n_layers, Hkv, D, BITS, seed=0, model_name="smollm2")
    layers = args.layers if args.layers else list(range(FIRST_SPARSE, n_layers))
    out, scales = [], {}
    c0 = time.process_time()
    for i in range(n_layers):
        R = hw0.layer(i).float()
        if i not in layers:
            out.append(R)
            continue
        t1 = time.time()
        if args.variant in ("scale", "scale-rr", "rot", "slow-free"):
            S = fit_gradient(_groups(train, i, args.queries), R, steps=args.steps, lr=args.lr,
                             beta=args.beta, tau=args.tau, rot=args.variant == "rot",
                             redraw=args.variant == "scale-rr", layer=i,
                             slow_from=args.slow_from if args.variant == "slow-free" else None,
                             target_max=args.target == "max")
        else:
            a, b, C = band_stats(train, i)
            if args.variant == "corr":
                u = solve_corr(a, b, C, args.sigma2)
            else:
                u = (torch.diagonal(C, dim1=-2, dim2=-1) / (a * b)).sqrt()
                u = u / u.mean(1, keepdim=True)
            S = rope_s_matrix(u.sqrt().float())
        W = S @ R
        out.append((W / W.norm(dim=1, keepdim=True)).contiguous())
        sc = torch.diagonal(S, dim1=-2, dim2=-1)[:, : D // 2]
        scales[i] = sc
        print(f"layer {i}: {time.time() - t1:.1f}s  s min/max {float(sc.min()):.2f}/{float(sc.max()):.2f}",
              flush=True)
    hw = HashWeights.from_tensors(out, model_name="smollm2", trained=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    hw.save(args.out)
    torch.save(scales, args.out + ".scales.pt")
    print(f"wrote {args.out}; fitting {time.process_time() - c0:.0f} CPU-s, total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
