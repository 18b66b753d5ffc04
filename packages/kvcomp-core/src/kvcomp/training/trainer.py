"""HATA hash training: one projection per (layer, kv-head), or per (layer, MLA part).

    weights = train_hash_weights(model, documents, TrainConfig(bits=128), out="W.safetensors")

Objectives: ``"hata"`` (below) or ``"block-rank"`` (``kvcomp.training.block_rank``: Adam on a
ranking loss over blocks, for ``token_score="centered_norm"``; GQA only; the same init, seeding,
checkpoints, resume and distribution as HATA). Block-rank fits either every entry of W
(``rank_param="free"``) or a per-RoPE-plane scale of the random init (``"rope-scale"``: W = S R,
S commuting with RoPE, so the fit holds at positions it never saw; ``rank_free_planes`` slowest
planes may get a free block); the output is a plain W either way.

Recipe (paper): initialise from kvcomp's seeded random orthogonal weights, SGD lr 0.1,
momentum 0.9, weight decay 1e-6, ``epochs`` x ``iters_per_epoch`` iterations (15 x 20) per
layer, the HATA loss of ``kvcomp.training.loss``. One iteration = one document's keys against a
chunk of ``queries_per_iter`` of its sampled queries (the units are shuffled per epoch by a
generator seeded with (seed, layer, epoch)). The kv-heads of a GQA layer are trained together
as a batch of independent projections (their losses add, gradients stay separate).

Deterministic for a seed: every random draw comes from a generator seeded by (seed, layer, ...),
so a layer's result does not depend on which process trains it or on the others.

Resumable: each finished layer is written to ``<out>.ckpt/layer_{i:03d}.safetensors`` (with the
training settings in its metadata); with ``resume=True`` those layers are loaded instead of
retrained (their pairs are not collected). A checkpoint written with other settings (bits,
loss, recipe, ``center_keys``, ...) is refused with a ValueError naming them, never mixed in.

Distributed: under ``accelerate launch --multi_gpu --num_processes N`` or ``torchrun`` (WORLD_SIZE
> 1 in the environment) the process group is joined through ``kvcomp.distributed.init`` (gloo);
rank r trains the layers l with l % N == r (every rank runs the model over the documents to
collect its layers' pairs), the trained tensors and each rank's stats are gathered on rank 0,
which alone writes the output. The result equals a one-process run up to float summation order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvcomp import distributed
from kvcomp.training.block_rank import PARAMS, POOLS, collect_groups, fit_block_rank
from kvcomp.training.collect import PairSet, collect_pairs, dense_labels
from kvcomp.training.loss import LossWeights, hata_loss

log = logging.getLogger("kvcomp.training")

OBJECTIVES = ("hata", "block-rank")
BLOCK_RANK_FIELDS = ("objective", "rank_steps", "rank_lr", "rank_beta", "rank_tau", "chunk_size",
                     "rank_param", "rank_free_planes", "rank_pool")


@dataclass
class TrainConfig:
    bits: int = 128  # GQA bits; MLA: bits_kv + bits_rope
    bits_kv: int = 512  # MLA latent bits
    bits_rope: int = 64  # MLA rope bits
    epochs: int = 15
    iters_per_epoch: int = 20
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-6
    loss: LossWeights = field(default_factory=LossWeights)
    n_queries: int = 32  # sampled query positions per document (x G query heads)
    queries_per_iter: int = 48  # query rows per iteration (per projection)
    pos_frac: float = 0.1  # share of keys labelled positive
    # keys per iteration: None = all keys of the document; else every positive key of the
    # iteration's queries plus a seeded random sample of the other keys, up to this many
    keys_per_iter: int | None = None
    seed: int = 0
    layers: tuple[int, ...] | None = None  # None = every layer
    # train on centred keys (GQA): each document's keys minus the mean of its first half (the
    # queries are drawn from the second half), as token_score "centered_norm" hashes k - mu
    center_keys: bool = False
    # "hata" (the paper's loss on token pairs) or "block-rank" (kvcomp.training.block_rank: a
    # ranking loss on blocks for token_score "centered_norm"; GQA). The rank_* settings and
    # chunk_size are block-rank's; n_queries is shared (block-rank wants more, e.g. 256)
    objective: str = "hata"
    rank_steps: int = 400
    rank_lr: float = 0.01
    rank_beta: float = 3.0
    rank_tau: float = 0.1
    chunk_size: int = 16
    # block-rank parameterisation: "free" (every entry of W) or "rope-scale" (W = diag(s) R per
    # RoPE plane, R the random init; position-robust; kvcomp.training.block_rank)
    rank_param: str = "free"
    # rope-scale: the number of slowest RoPE planes that get a free block instead of a scale
    rank_free_planes: int = 0
    # block-rank: how the fit pools a block's tokens: "max" (for chunk_repre "max") or "lse"
    # (for chunk_repre "lse": the log-sum-exp of the estimated logits)
    rank_pool: str = "max"

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"TrainConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.rank_param not in PARAMS:
            raise ValueError(f"TrainConfig.rank_param must be one of {PARAMS}, got {self.rank_param!r}")
        if self.rank_pool not in POOLS:
            raise ValueError(f"TrainConfig.rank_pool must be one of {POOLS}, got {self.rank_pool!r}")
        if self.rank_pool != "max" and self.objective != "block-rank":
            raise ValueError("TrainConfig.rank_pool is a setting of objective 'block-rank'")
        if self.rank_param != "free" and self.objective != "block-rank":
            raise ValueError("TrainConfig.rank_param is a setting of objective 'block-rank'")
        v = self.rank_free_planes
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"TrainConfig.rank_free_planes must be an int >= 0, got {v!r}")
        if v and self.rank_param != "rope-scale":
            raise ValueError("TrainConfig.rank_free_planes is a setting of rank_param 'rope-scale'")
        for name in ("rank_steps", "chunk_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("rank_lr", "rank_beta", "rank_tau"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise ValueError(f"TrainConfig.{name} must be a finite number > 0, got {v!r}")
        for name in ("bits", "bits_kv", "bits_rope"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v % 32:
                raise ValueError(f"TrainConfig.{name} must be a positive multiple of 32, got {v!r}")
        if self.keys_per_iter is not None and (not isinstance(self.keys_per_iter, int) or self.keys_per_iter < 1):
            raise ValueError(f"TrainConfig.keys_per_iter must be None or an int >= 1, got {self.keys_per_iter!r}")
        for name in ("epochs", "iters_per_epoch", "n_queries", "queries_per_iter"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")


# ----------------------------------------------------------------------------- model geometry
@dataclass(frozen=True)
class ModelGeometry:
    num_layers: int
    is_mla: bool
    num_kv_heads: int = 0
    head_dim: int = 0
    rotary_dim: int = 0  # GQA: the RoPE-rotated leading dims of a head (partial_rotary_factor)
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    model_name: str = ""

    @classmethod
    def of(cls, model) -> ModelGeometry:
        c = model.config
        name = getattr(c, "_name_or_path", "") or getattr(c, "model_type", "")
        if getattr(c, "kv_lora_rank", None):
            return cls(c.num_hidden_layers, True, kv_lora_rank=c.kv_lora_rank,
                       qk_rope_head_dim=c.qk_rope_head_dim, model_name=str(name))
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        rope = getattr(c, "rope_parameters", None)
        factor = (rope or {}).get("partial_rotary_factor") if isinstance(rope, dict) else None
        factor = factor or getattr(c, "partial_rotary_factor", None) or 1.0
        return cls(c.num_hidden_layers, False, num_kv_heads=kv, head_dim=head_dim,
                   rotary_dim=int(head_dim * factor), model_name=str(name))


def initial_weights(geo: ModelGeometry, cfg: TrainConfig):
    """The seeded random orthogonal HashWeights training starts from (the "random" baseline)."""
    from kvcomp.hashing import HashWeights

    if geo.is_mla:
        return HashWeights.random_mla(geo.num_layers, geo.kv_lora_rank, geo.qk_rope_head_dim,
                                      bits_kv=cfg.bits_kv, bits_rope=cfg.bits_rope, seed=cfg.seed,
                                      model_name=geo.model_name)
    return HashWeights.random(geo.num_layers, geo.num_kv_heads, geo.head_dim, cfg.bits,
                              seed=cfg.seed, model_name=geo.model_name)


def layer_parts(geo: ModelGeometry, hw, layer: int) -> dict[str, torch.Tensor]:
    """{part: W [D, BITS]} of a layer: ``h{i}`` per kv-head (GQA) or ``latent`` / ``rope``."""
    if geo.is_mla:
        return {"latent": hw.latent(layer)[0].float(), "rope": hw.rope(layer)[0].float()}
    w = hw.layer(layer).float()
    return {f"h{i}": w[i] for i in range(w.shape[0])}


# ----------------------------------------------------------------------------- one layer
def _units(pairs: PairSet, per_iter: int, gen: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    units = []
    for d in range(pairs.num_docs):
        n = pairs.q[d].shape[0]
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, per_iter):
            units.append((d, order[s : s + per_iter]))
    return units


def train_projections(
    pair_sets: list[PairSet],
    W0: torch.Tensor,
    cfg: TrainConfig,
    *,
    layer: int,
    device: str | torch.device = "cpu",
    progress=None,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Train P projections together. ``pair_sets``: P PairSets with identical document shapes
    (the kv-heads of a layer); W0 [P, D, BITS] float32. Returns (W [P, D, BITS] float32 on CPU,
    per-iteration loss history)."""
    P = len(pair_sets)
    if W0.dim() != 3 or W0.shape[0] != P:
        raise ValueError(f"W0 must be [{P}, D, BITS], got {tuple(W0.shape)}")
    ref = pair_sets[0]
    for ps in pair_sets[1:]:
        if ps.num_docs != ref.num_docs or any(
            a.shape != b.shape for a, b in zip(ps.q + ps.k, ref.q + ref.k)
        ):
            raise ValueError("train_projections: pair sets must have identical document shapes")
    gen = torch.Generator().manual_seed(int(cfg.seed) * 7919 + layer)
    units = _units(ref, cfg.queries_per_iter, gen)
    # materialise each unit once: q [P, n, D], k [P, T, D], labels [P, n, T] on the device
    keys = [torch.stack([ps.k[d] for ps in pair_sets]).to(device) for d in range(ref.num_docs)]
    if cfg.center_keys:  # k - mu, mu = the mean of the document's first half per projection
        keys = [k - k[:, : max(1, k.shape[1] // 2)].mean(1, keepdim=True) for k in keys]
    batches = []
    for d, rows in units:
        q = torch.stack([ps.q[d][rows] for ps in pair_sets]).to(device)
        S = torch.stack([dense_labels(ps.t[d][rows], ps.pos_idx[d][rows], ps.k[d].shape[0])
                         for ps in pair_sets])
        k = keys[d]
        T = S.shape[-1]
        if cfg.keys_per_iter is not None and cfg.keys_per_iter < T:
            pos = (S > 0).any(1).any(0)  # [T] keys that are a positive of some query
            others = (~pos).nonzero().squeeze(1)
            n_more = max(0, cfg.keys_per_iter - int(pos.sum()))
            pick = others[torch.randperm(others.numel(), generator=gen)[:n_more]]
            sub = torch.cat([pos.nonzero().squeeze(1), pick]).sort().values
            S, k = S[..., sub], k[:, sub.to(k.device)]
        batches.append((q, k, S.to(device)))
    W = W0.detach().clone().float().to(device).requires_grad_(True)
    opt = torch.optim.SGD([W], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    history = []
    for epoch in range(cfg.epochs):
        egen = torch.Generator().manual_seed((int(cfg.seed) * 7919 + layer) * 1000 + epoch)
        perm = torch.randperm(len(units), generator=egen).tolist()
        for it in range(cfg.iters_per_epoch):
            q, k, S = batches[perm[it % len(units)]]
            loss, parts = hata_loss(q, k, S, W, cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            parts["loss"] = float(loss.detach())
            history.append(parts)
            if progress is not None:
                progress.set_postfix(layer=layer, epoch=epoch, loss=f"{parts['loss']:.4f}", refresh=False)
    return W.detach().cpu(), history


# ----------------------------------------------------------------------------- checkpoints
def _ckpt_dir(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".ckpt")


def _settings(cfg: TrainConfig) -> dict:
    """What a layer's training depends on (not which layers a run trains). The block-rank
    settings are left out of HATA runs and ``rank_param`` of "free" runs, so checkpoints of
    earlier versions still resume."""
    drop = {"layers"} | (set(BLOCK_RANK_FIELDS) if cfg.objective == "hata" else set())
    if cfg.rank_param == "free":
        drop |= {"rank_param", "rank_free_planes"}
    return {k: v for k, v in asdict(cfg).items() if k not in drop}


def _save_layer(ckpt: Path, layer: int, parts: dict[str, torch.Tensor], cfg: TrainConfig) -> None:
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / f".layer_{layer:03d}.tmp"
    save_file({k: v.contiguous() for k, v in parts.items()}, str(tmp),
              metadata={"train_config": json.dumps(_settings(cfg), sort_keys=True)})
    os.replace(tmp, ckpt / f"layer_{layer:03d}.safetensors")


def _load_layer(ckpt: Path, layer: int, cfg: TrainConfig) -> dict[str, torch.Tensor] | None:
    """The checkpoint of ``layer``, or None; a ValueError if it was trained with other settings."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = ckpt / f"layer_{layer:03d}.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        saved = json.loads((f.metadata() or {}).get("train_config", "null"))
    want = json.loads(json.dumps(_settings(cfg), sort_keys=True))
    if saved != want:
        diff = sorted(k for k in set(want) | set(saved or {}) if (saved or {}).get(k) != want.get(k))
        raise ValueError(f"resume: {path} was trained with other settings ({', '.join(diff)}); "
                         "use the same settings or another --out")
    return load_file(str(path))


# ----------------------------------------------------------------------------- entry point
def train_hash_weights(
    model,
    documents: list[torch.Tensor],
    cfg: TrainConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
):
    """Train hash weights for every layer of ``model`` on ``documents`` ([T] int64 token ids).

    Returns the trained ``kvcomp.hashing.HashWeights`` (trained="1") on rank 0 (``None`` on the
    other ranks); writes it to ``out`` (safetensors) when given. ``resume`` reuses the per-layer
    checkpoints under ``<out>.ckpt/`` (requires ``out``)."""
    cfg = cfg or TrainConfig()
    cfg.validate()
    if resume and out is None:
        raise ValueError("resume=True needs out= (checkpoints live in <out>.ckpt/)")
    if not documents:
        raise ValueError("no training documents")
    geo = ModelGeometry.of(model)
    if cfg.center_keys and geo.is_mla:
        raise ValueError("center_keys is for GQA models (token_score centered_norm); this model is MLA")
    if cfg.objective == "block-rank" and geo.is_mla:
        raise ValueError("objective 'block-rank' is for GQA models (token_score centered_norm); "
                         "this model is MLA")
    if cfg.rank_free_planes > geo.rotary_dim // 2 and not geo.is_mla:
        raise ValueError(f"rank_free_planes {cfg.rank_free_planes} exceeds the model's "
                         f"{geo.rotary_dim // 2} RoPE planes per head")
    device = device or model.device
    ctx = distributed.init()
    rank, world = ctx.rank, ctx.world
    hw0 = initial_weights(geo, cfg)
    layers = list(range(geo.num_layers)) if cfg.layers is None else sorted(set(cfg.layers))
    for layer in layers:
        if not 0 <= layer < geo.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {geo.num_layers})")
    mine = [layer for layer in layers if layer % world == rank]
    ckpt = _ckpt_dir(out) if out is not None else None
    done: dict[int, dict[str, torch.Tensor]] = {}
    if resume and ckpt is not None:
        for layer in mine:
            got = _load_layer(ckpt, layer, cfg)
            if got is not None:
                done[layer] = got
    todo = [layer for layer in mine if layer not in done]
    stats = {"rank": rank, "world": world, "device": str(device), "layers_trained": todo,
             "layers_resumed": sorted(done)}
    t0 = time.perf_counter()
    if todo:
        if cfg.objective == "block-rank":
            pairs = collect_groups(model, documents, layers=todo, n_queries=cfg.n_queries,
                                   seed=cfg.seed, progress=progress and rank == 0)
            stats["queries_per_projection"] = {f"{k[0]}.{k[1]}": int(sum(q.shape[0] * q.shape[1] for q in v.q))
                                               for k, v in list(pairs.items())[:4]}
        else:
            pairs = collect_pairs(model, documents, layers=todo, n_queries=cfg.n_queries,
                                  pos_frac=cfg.pos_frac, seed=cfg.seed, progress=progress and rank == 0)
            stats["pairs_per_projection"] = {f"{k[0]}.{k[1]}": v.num_pairs() for k, v in list(pairs.items())[:4]}
        stats["collect_s"] = time.perf_counter() - t0
        bar = None
        if progress and rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"train (rank {rank}/{world})", unit="layer")
        for layer in todo:
            init = layer_parts(geo, hw0, layer)
            trained: dict[str, torch.Tensor] = {}
            groups = [["latent"], ["rope"]] if geo.is_mla else [list(init)]
            for names in groups:
                W0 = torch.stack([init[n] for n in names])
                if cfg.objective == "block-rank":
                    W, _ = fit_block_rank([pairs[(layer, n)] for n in names], W0,
                                          steps=cfg.rank_steps, lr=cfg.rank_lr, beta=cfg.rank_beta,
                                          tau=cfg.rank_tau, chunk=cfg.chunk_size, device=device,
                                          progress=bar, layer=layer, param=cfg.rank_param,
                                          rotary_dim=geo.rotary_dim or None,
                                          free_planes=cfg.rank_free_planes, pool=cfg.rank_pool)
                else:
                    W, _ = train_projections([pairs[(layer, n)] for n in names], W0, cfg,
                                             layer=layer, device=device, progress=bar)
                for i, n in enumerate(names):
                    trained[n] = W[i]
            for n in list(pairs):
                if n[0] == layer:
                    del pairs[n]
            if ckpt is not None:
                _save_layer(ckpt, layer, trained, cfg)
            done[layer] = trained
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    stats["total_s"] = time.perf_counter() - t0

    gathered = distributed.gather((done, stats), ctx)
    result = None
    if ctx.is_main:
        merged: dict[int, dict[str, torch.Tensor]] = {}
        for part, _ in gathered:
            merged.update(part)
        result = assemble(geo, hw0, merged, cfg)
        result.train_stats = {**stats, "ranks": [s for _, s in gathered]} if world > 1 else stats
        if out is not None:
            result.save(out)
            log.info("wrote %s (%d trained layers)", out, len(merged))
    distributed.finish(ctx)
    return result


def assemble(geo: ModelGeometry, hw0, trained: dict[int, dict[str, torch.Tensor]], cfg: TrainConfig):
    """A trained HashWeights: the trained layers' tensors, the random init elsewhere."""
    from kvcomp.hashing import HashWeights

    if geo.is_mla:
        latents = [trained[i]["latent"].unsqueeze(0) if i in trained else hw0.latent(i).float()
                   for i in range(geo.num_layers)]
        ropes = [trained[i]["rope"].unsqueeze(0) if i in trained else hw0.rope(i).float()
                 for i in range(geo.num_layers)]
        return HashWeights.from_tensors(list(zip(latents, ropes)), model_name=geo.model_name,
                                        trained=True)
    keys = []
    for i in range(geo.num_layers):
        if i in trained:
            keys.append(torch.stack([trained[i][f"h{h}"] for h in range(geo.num_kv_heads)]))
        else:
            keys.append(hw0.layer(i).float())
    return HashWeights.from_tensors(keys, model_name=geo.model_name, trained=True)


def config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["layers"] = list(cfg.layers) if cfg.layers is not None else None
    return d
