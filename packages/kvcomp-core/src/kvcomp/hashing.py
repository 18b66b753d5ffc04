"""Hash weights: one projection ``[D, BITS]`` per (layer, kv-head), random or trained.

Kinds
-----
``"gqa"``  per layer a float32 tensor ``[Hkv, D, BITS]`` (D = head_dim): ``layer(i)``.
``"mla"``  per layer ``latent`` ``[1, R, bits_kv]`` (R = kv_lora_rank) and ``rope``
           ``[1, P, bits_rope]`` (P = qk_rope_head_dim): ``latent(i)``, ``rope(i)``.

Random weights
--------------
Haar-random orthogonal projections. For each (layer, kv-head, block) a ``[D, D]`` standard
Gaussian is drawn in float64 from a CPU ``torch.Generator`` seeded with the first 8 bytes of
``sha256("kvcomp-hash/<seed>/<part>/<layer>/<head>/<block>")`` (part "key", "latent" or
"rope"), then orthogonalised by a float64 Householder QR written in plain torch ops (no LAPACK,
whose results vary across builds), with the column signs fixed so that diag(R) > 0 (which
makes Q Haar-distributed). ``bits <= D`` takes the first ``bits`` columns of one block;
``bits > D`` stacks ``ceil(bits / D)`` independent blocks column-wise and takes the first
``bits`` columns. The result is rounded to float32. The same seed gives the same weights on
every machine (the test suite pins sha256 digests of codes computed from them).

File schema (safetensors)
-------------------------
Tensors, all float32, contiguous:

    gqa:  ``layers.{i}.key``     [num_kv_heads, head_dim, bits]          i = 0 .. num_layers-1
    mla:  ``layers.{i}.latent``  [1, kv_lora_rank, bits_kv]
          ``layers.{i}.rope``    [1, qk_rope_head_dim, bits_rope]

Metadata (all values strings):

    format      "kvcomp-hash-weights"          version "1"
    kind        "gqa" | "mla"                  model_name   free text (may be empty)
    num_layers  int                            seed         int (of random weights; "0" else)
    trained     "0" | "1"
    gqa:        bits, num_kv_heads, head_dim
    mla:        bits_kv, bits_rope, kv_lora_rank, qk_rope_head_dim

Every problem with a file or a mismatch with the model raises :class:`kvcomp.ConfigError`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from kvcomp.config import ConfigError, KVCompConfig

__all__ = ["HashWeights", "orthogonal_projection", "haar_orthogonal"]

FORMAT = "kvcomp-hash-weights"
VERSION = "1"


def _seed_of(seed: int, part: str, layer: int, head: int, block: int) -> int:
    digest = hashlib.sha256(f"kvcomp-hash/{seed}/{part}/{layer}/{head}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _householder_q(a: torch.Tensor) -> torch.Tensor:
    """Q of the QR decomposition of a batch of square float64 matrices a [N, D, D], with the
    columns' signs chosen so that diag(R) > 0. Householder reflections in plain torch ops."""
    n, d, _ = a.shape
    r = a.clone()
    q = torch.eye(d, dtype=a.dtype).expand(n, d, d).clone()
    for j in range(d - 1):
        x = r[:, j:, j]  # [N, d-j]
        norm = torch.sqrt((x * x).sum(-1))  # [N]
        sign = torch.where(x[:, 0] >= 0, 1.0, -1.0).to(a.dtype)
        v = x.clone()
        v[:, 0] = v[:, 0] + sign * norm  # v = x + sign(x0) ||x|| e1, reflects x to -sign ||x|| e1
        vnorm2 = (v * v).sum(-1)  # [N]
        scale = torch.where(vnorm2 > 0, 2.0 / vnorm2, torch.zeros_like(vnorm2))
        # R[j:, j:] -= scale v (v^T R[j:, j:]);  Q[:, j:] -= scale (Q[:, j:] v) v^T
        sv = (scale.unsqueeze(-1) * v).unsqueeze(-1)  # [N, d-j, 1]
        vr = torch.matmul(v.unsqueeze(-2), r[:, j:, j:])  # [N, 1, d-j]
        r[:, j:, j:].baddbmm_(sv, vr, alpha=-1)  # rank-1 updates as BLAS calls
        qv = torch.matmul(q[:, :, j:], v.unsqueeze(-1))  # [N, d, 1]
        q[:, :, j:].baddbmm_(qv, sv.transpose(-1, -2), alpha=-1)
    diag = torch.diagonal(r, dim1=-2, dim2=-1)  # [N, d]
    signs = torch.where(diag < 0, -1.0, 1.0).to(a.dtype)
    return q * signs.unsqueeze(-2)


def haar_orthogonal(seeds: list[int], dim: int) -> torch.Tensor:
    """float64 [len(seeds), dim, dim] Haar-random orthogonal matrices, one per generator seed."""
    g = torch.Generator(device="cpu")
    mats = []
    for s in seeds:
        g.manual_seed(s)
        mats.append(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    # One intra-op thread: the float64 sums then do not depend on the machine's thread count,
    # and these small ops are faster single-threaded (OpenMP barriers dominate otherwise).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _householder_q(torch.stack(mats))
    finally:
        torch.set_num_threads(threads)


def orthogonal_projection(
    num_heads: int, dim: int, bits: int, *, seed: int, layer: int, part: str = "key"
) -> torch.Tensor:
    """float32 [num_heads, dim, bits]: per head ``ceil(bits / dim)`` independent orthogonal
    [dim, dim] blocks stacked column-wise, first ``bits`` columns kept."""
    nblk = -(-bits // dim)
    seeds = [_seed_of(seed, part, layer, h, b) for h in range(num_heads) for b in range(nblk)]
    q = haar_orthogonal(seeds, dim).view(num_heads, nblk, dim, dim)
    w = q.permute(0, 2, 1, 3).reshape(num_heads, dim, nblk * dim)[..., :bits]
    return w.to(torch.float32).contiguous()


def _need_pos_int(name: str, v, *, mult32: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (mult32 and v % 32):
        what = "a positive multiple of 32" if mult32 else "an int >= 1"
        raise ConfigError(f"{name}: expected {what}, got {v!r}")
    return v


class HashWeights:
    """Hash projections of a whole model (see the module docstring for kinds and schema).

    Random weights are generated lazily per layer and cached; ``layer(i)`` returns them on the
    requested device/dtype."""

    def __init__(self, kind: str, meta: dict, tensors: dict[str, torch.Tensor] | None = None):
        if kind not in ("gqa", "mla"):
            raise ConfigError(f"kind: expected 'gqa' or 'mla', got {kind!r}")
        self.kind = kind
        self.meta = dict(meta)
        self.num_layers = _need_pos_int("num_layers", meta["num_layers"])
        self.seed = int(meta.get("seed", 0))
        self.model_name = str(meta.get("model_name", ""))
        self.trained = bool(meta.get("trained", False))
        if kind == "gqa":
            self.num_kv_heads = _need_pos_int("num_kv_heads", meta["num_kv_heads"])
            self.head_dim = _need_pos_int("head_dim", meta["head_dim"])
            self.bits = _need_pos_int("bits", meta["bits"], mult32=True)
        else:
            self.kv_lora_rank = _need_pos_int("kv_lora_rank", meta["kv_lora_rank"])
            self.qk_rope_head_dim = _need_pos_int("qk_rope_head_dim", meta["qk_rope_head_dim"])
            self.bits_kv = _need_pos_int("bits_kv", meta["bits_kv"], mult32=True)
            self.bits_rope = _need_pos_int("bits_rope", meta["bits_rope"], mult32=True)
            self.bits = self.bits_kv + self.bits_rope
        self._tensors: dict[str, torch.Tensor] = dict(tensors or {})
        if tensors is not None:
            self._check_tensors()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def random(
        cls, num_layers: int, num_kv_heads: int, head_dim: int, bits: int, seed: int = 0,
        model_name: str = "",
    ) -> HashWeights:
        """Seeded random orthogonal weights for a GQA model (generated lazily per layer)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed: expected an int >= 0, got {seed!r}")
        return cls("gqa", dict(num_layers=num_layers, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, bits=bits, seed=seed, model_name=model_name))

    @classmethod
    def random_mla(
        cls, num_layers: int, kv_lora_rank: int, qk_rope_head_dim: int, bits_kv: int = 512,
        bits_rope: int = 64, seed: int = 0, model_name: str = "",
    ) -> HashWeights:
        """Seeded random orthogonal weights for an MLA model (latent and rope parts)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed: expected an int >= 0, got {seed!r}")
        return cls("mla", dict(num_layers=num_layers, kv_lora_rank=kv_lora_rank,
                               qk_rope_head_dim=qk_rope_head_dim, bits_kv=bits_kv,
                               bits_rope=bits_rope, seed=seed, model_name=model_name))

    @classmethod
    def from_tensors(cls, layers: list, *, model_name: str = "", trained: bool = True) -> HashWeights:
        """Wrap given weights (e.g. from training). GQA: ``layers[i]`` float [Hkv, D, BITS];
        MLA: ``layers[i] = (latent [1, R, bits_kv], rope [1, P, bits_rope])``."""
        if not layers:
            raise ConfigError("layers: expected at least one layer of weights, got none")
        first = layers[0]
        if isinstance(first, (tuple, list)):
            lat, rope = first
            meta = dict(num_layers=len(layers), kv_lora_rank=lat.shape[1],
                        qk_rope_head_dim=rope.shape[1], bits_kv=lat.shape[2],
                        bits_rope=rope.shape[2], seed=0, model_name=model_name, trained=trained)
            tensors = {}
            for i, (a, b) in enumerate(layers):
                tensors[f"layers.{i}.latent"] = a.detach().to("cpu", torch.float32).contiguous()
                tensors[f"layers.{i}.rope"] = b.detach().to("cpu", torch.float32).contiguous()
            return cls("mla", meta, tensors)
        meta = dict(num_layers=len(layers), num_kv_heads=first.shape[0], head_dim=first.shape[1],
                    bits=first.shape[2], seed=0, model_name=model_name, trained=trained)
        tensors = {f"layers.{i}.key": w.detach().to("cpu", torch.float32).contiguous()
                   for i, w in enumerate(layers)}
        return cls("gqa", meta, tensors)

    @classmethod
    def from_config(cls, config: KVCompConfig, num_kv_heads: int | None = None) -> HashWeights:
        """Random weights (seeded by config.seed) or the trained file of the config, checked
        against the config's shapes. ``num_kv_heads`` is required for GQA configs."""
        if config.is_mla:
            if config.hash_weight_type == "trained":
                hw = cls.load(config.hash_weights_path)
            else:
                return cls.random_mla(config.num_hidden_layers, config.kv_lora_rank,
                                      config.qk_rope_head_dim, config.hash_bits_kv_lora,
                                      config.hash_bits_qk_rope, seed=config.seed,
                                      model_name=config.model_name)
            hw.check_against(num_layers=config.num_hidden_layers, kv_lora_rank=config.kv_lora_rank,
                             qk_rope_head_dim=config.qk_rope_head_dim,
                             bits_kv=config.hash_bits_kv_lora, bits_rope=config.hash_bits_qk_rope)
            return hw
        if num_kv_heads is None:
            raise ConfigError("num_kv_heads: required to build hash weights for a GQA config")
        if config.hash_weight_type == "trained":
            hw = cls.load(config.hash_weights_path)
            hw.check_against(num_layers=config.num_hidden_layers, num_kv_heads=num_kv_heads,
                             head_dim=config.head_dim, bits=config.hash_bits)
            return hw
        return cls.random(config.num_hidden_layers, num_kv_heads, config.head_dim,
                          config.hash_bits, seed=config.seed, model_name=config.model_name)

    # ------------------------------------------------------------------ access
    def _index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_layers:
            raise IndexError(f"layer must be an int in [0, {self.num_layers}), got {i!r}")
        return i

    def _get(self, name: str, part: str, i: int, heads: int, dim: int, bits: int) -> torch.Tensor:
        if name not in self._tensors:
            self._tensors[name] = orthogonal_projection(heads, dim, bits, seed=self.seed,
                                                        layer=i, part=part)
        return self._tensors[name]

    @staticmethod
    def _to(t: torch.Tensor, device, dtype) -> torch.Tensor:
        return t.to(device=device if device is not None else t.device,
                    dtype=dtype if dtype is not None else t.dtype)

    def layer(self, i: int, device=None, dtype=None) -> torch.Tensor:
        """GQA weights of layer i: [num_kv_heads, head_dim, bits] (float32 unless dtype)."""
        if self.kind != "gqa":
            raise ValueError("layer(i) is for GQA weights; MLA weights have latent(i) and rope(i)")
        i = self._index(i)
        w = self._get(f"layers.{i}.key", "key", i, self.num_kv_heads, self.head_dim, self.bits)
        return self._to(w, device, dtype)

    def latent(self, i: int, device=None, dtype=None) -> torch.Tensor:
        """MLA latent weights of layer i: [1, kv_lora_rank, bits_kv]."""
        if self.kind != "mla":
            raise ValueError("latent(i) is for MLA weights; GQA weights have layer(i)")
        i = self._index(i)
        w = self._get(f"layers.{i}.latent", "latent", i, 1, self.kv_lora_rank, self.bits_kv)
        return self._to(w, device, dtype)

    def rope(self, i: int, device=None, dtype=None) -> torch.Tensor:
        """MLA rope weights of layer i: [1, qk_rope_head_dim, bits_rope]."""
        if self.kind != "mla":
            raise ValueError("rope(i) is for MLA weights; GQA weights have layer(i)")
        i = self._index(i)
        w = self._get(f"layers.{i}.rope", "rope", i, 1, self.qk_rope_head_dim, self.bits_rope)
        return self._to(w, device, dtype)

    def _expected(self) -> dict[str, tuple[int, ...]]:
        if self.kind == "gqa":
            shape = (self.num_kv_heads, self.head_dim, self.bits)
            return {f"layers.{i}.key": shape for i in range(self.num_layers)}
        out = {}
        for i in range(self.num_layers):
            out[f"layers.{i}.latent"] = (1, self.kv_lora_rank, self.bits_kv)
            out[f"layers.{i}.rope"] = (1, self.qk_rope_head_dim, self.bits_rope)
        return out

    def _check_tensors(self, where: str = "hash weights") -> None:
        expected = self._expected()
        missing = [k for k in expected if k not in self._tensors]
        if missing:
            shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
            raise ConfigError(f"{where}: missing tensor(s) {shown} ({len(missing)} of {len(expected)})")
        extra = [k for k in self._tensors if k not in expected]
        if extra:
            raise ConfigError(f"{where}: unexpected tensor(s) {', '.join(sorted(extra)[:4])}")
        for k, shape in expected.items():
            t = self._tensors[k]
            if tuple(t.shape) != shape:
                raise ConfigError(f"{where}: tensor {k} has shape {tuple(t.shape)}, expected {shape}")
            if t.dtype != torch.float32:
                raise ConfigError(f"{where}: tensor {k} has dtype {t.dtype}, expected torch.float32")
            if not torch.isfinite(t).all():
                raise ConfigError(f"{where}: tensor {k} has non-finite values")

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, str]:
        """The safetensors metadata of this object (all strings)."""
        md = {"format": FORMAT, "version": VERSION, "kind": self.kind,
              "model_name": self.model_name, "num_layers": str(self.num_layers),
              "seed": str(self.seed), "trained": "1" if self.trained else "0"}
        if self.kind == "gqa":
            md.update(bits=str(self.bits), num_kv_heads=str(self.num_kv_heads),
                      head_dim=str(self.head_dim))
        else:
            md.update(bits_kv=str(self.bits_kv), bits_rope=str(self.bits_rope),
                      kv_lora_rank=str(self.kv_lora_rank),
                      qk_rope_head_dim=str(self.qk_rope_head_dim))
        return md

    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors by schema name (random ones generated now), float32 on CPU."""
        for i in range(self.num_layers):
            if self.kind == "gqa":
                self.layer(i)
            else:
                self.latent(i)
                self.rope(i)
        return {k: self._tensors[k].to("cpu", torch.float32).contiguous() for k in self._expected()}

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file with the schema of the module docstring."""
        from safetensors.torch import save_file

        save_file(self.tensors(), os.fspath(path), metadata=self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> HashWeights:
        """Read a file written by :meth:`save` (or a trainer following the schema)."""
        from safetensors import safe_open

        p = Path(path) if path is not None else None
        if p is None or not p.is_file():
            raise ConfigError(f"hash_weights_path: file not found: {path}")
        try:
            with safe_open(os.fspath(p), framework="pt") as f:
                md = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ConfigError(f"hash weights {p}: not a readable safetensors file ({e})") from None
        where = f"hash weights {p}"
        if md.get("format") != FORMAT:
            raise ConfigError(f"{where}: metadata format is {md.get('format')!r}, expected {FORMAT!r}")
        if md.get("version") != VERSION:
            raise ConfigError(f"{where}: metadata version is {md.get('version')!r}, expected {VERSION!r}")
        kind = md.get("kind")
        keys = ["num_layers", "trained"] + (
            ["bits", "num_kv_heads", "head_dim"] if kind == "gqa"
            else ["bits_kv", "bits_rope", "kv_lora_rank", "qk_rope_head_dim"]
        )
        if kind not in ("gqa", "mla"):
            raise ConfigError(f"{where}: metadata kind is {kind!r}, expected 'gqa' or 'mla'")
        meta: dict = {"model_name": md.get("model_name", "")}
        for k in keys + ["seed"]:
            v = md.get(k, "0" if k == "seed" else None)
            if v is None or not str(v).isdigit():
                raise ConfigError(f"{where}: metadata {k} is {v!r}, expected a non-negative int string")
            meta[k] = int(v)
        if meta["trained"] not in (0, 1):
            raise ConfigError(f"{where}: metadata trained is {md['trained']!r}, expected '0' or '1'")
        meta["trained"] = bool(meta["trained"])
        try:
            hw = cls(kind, meta)
        except ConfigError as e:
            raise ConfigError(f"{where}: metadata {e}") from None
        hw._tensors = tensors
        hw._check_tensors(where)
        return hw

    def check_against(
        self, *, num_layers: int | None = None, num_kv_heads: int | None = None,
        head_dim: int | None = None, bits: int | None = None, kv_lora_rank: int | None = None,
        qk_rope_head_dim: int | None = None, bits_kv: int | None = None,
        bits_rope: int | None = None,
    ) -> None:
        """Raise ConfigError naming every given property that differs from these weights."""
        want = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                    bits=bits, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
                    bits_kv=bits_kv, bits_rope=bits_rope)
        problems = []
        for k, v in want.items():
            if v is None:
                continue
            if not hasattr(self, k):
                problems.append(f"{k}={v} does not apply to {self.kind} hash weights")
            elif getattr(self, k) != v:
                problems.append(f"{k}: the model has {v}, the hash weights have {getattr(self, k)}")
        if problems:
            name = f" of {self.model_name!r}" if self.model_name else ""
            raise ConfigError(f"hash weights{name} do not fit the model: " + "; ".join(problems))

    def __repr__(self) -> str:
        if self.kind == "gqa":
            shape = f"layers={self.num_layers}, kv_heads={self.num_kv_heads}, " \
                    f"head_dim={self.head_dim}, bits={self.bits}"
        else:
            shape = f"layers={self.num_layers}, R={self.kv_lora_rank}, " \
                    f"P={self.qk_rope_head_dim}, bits={self.bits_kv}+{self.bits_rope}"
        src = "trained" if self.trained else f"random seed={self.seed}"
        return f"HashWeights({self.kind}, {shape}, {src})"
