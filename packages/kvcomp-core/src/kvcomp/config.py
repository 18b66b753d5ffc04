"""``KVCompConfig``: the KVComp JSON config (the seed's format), validated at load time.

The JSON format is the one of the original KVComp configs::

    {
        "model_name": "Qwen/Qwen3-4B",
        "is_mla": false,
        "hash_weight_type": "random",
        "num_hidden_layers": 36,
        "seq_len_threshhold": 2048,
        "chunk_size": 128,
        "chunk_repre_method": "max",
        "head_dim": 128,
        "hash_bits": 128,
        "top_k_ratio_per_layer": [0.3, 0.3, ..., 0.3],
        "top_k_index_reuse": [-1, -1, ..., -1],
        "must_select_blocks": [0, -2, -1],
    }

Fields (JSON key = Python name unless noted):

====================== ========================= ===============================================
field                  type / default            meaning
====================== ========================= ===============================================
model_name             str (required)            the model the config was made for
num_hidden_layers      int >= 1 (required)       decoder layers; length of the per-layer lists
hash_bits              int (required)            bits per hash code, a positive multiple of 32;
                                                 MLA: also the string "512+64" (latent + rope)
top_k_ratio_per_layer  list[float] (required)    per layer, in (0, 1]; 1.0 = dense layer;
                                                 a sparse layer selects ceil(ratio * n_blocks)
head_dim               int >= 1                  required unless is_mla
is_mla                 bool = false              DeepSeek MLA (latent cache, split hash)
hash_weight_type       "random" | "trained"      seeded random orthogonal, or trained weights
hash_weights_path      str | null                safetensors file, required iff "trained";
                                                 relative to the JSON file's folder
seed                   int >= 0 = 0              seed of the random hash weights
seq_len_threshold      int >= 0 = 2048           JSON key ``seq_len_threshhold`` (the seed's
                                                 spelling, written by to_json) or
                                                 ``seq_len_threshold``; shorter sequences decode
                                                 densely
chunk_size             int >= 1 = 128            tokens per block (1 = token-level top-k)
chunk_repre_method     "max" | "mean" | "lse"    block score from its token scores (default
                       = "max"                   "max"); "lse" (kvcomp extension, GQA only):
                                                 log-sum-exp of the tokens' estimated logits, the
                                                 log of the block's estimated attention mass
                                                 (``kvcomp.ops.hamming_topk``)
top_k_index_reuse      list[int] = all -1        -1, or an earlier layer j whose selection this
                                                 layer reuses (j computes its own, same ratio)
must_select_blocks     list[int] = [0, -2, -1]   blocks always selected; negative = from the end;
                                                 must contain -1 (the newest, partial block)
top_k_budget_tokens    int >= 1 | null           kvcomp extension: sparse layers select
                                                 ceil(budget / chunk_size) blocks instead
query_aggregation      "sum"|"majority"|"mean"   kvcomp extension: how a kv-head's query heads
                                                 are combined ("sum" = the paper's exact sum)
token_score            "hamming" |               kvcomp extension: "hamming" = the group score
                       "centered_norm"           of the codes (the paper's); "centered_norm" =
                                                 codes of k - mu (mu: mean key of the sequence's
                                                 first prefill, per kv-head) and the group score
                                                 times ||k - mu|| (GQA only; see
                                                 docs/results/smollm2.md)
kv_lora_rank           int (MLA, required)       latent width R (512 in DeepSeek-V2/V3)
qk_rope_head_dim       int (MLA, required)       rope key width P (64)
hash_bits_kv_lora      int (MLA) = 512           bits of the latent part
hash_bits_qk_rope      int (MLA) = 64            bits of the rope part; the two sum to hash_bits
====================== ========================= ===============================================

There is no ``dense_layers`` field: a ratio of 1.0 makes a layer dense.

JSON parsing is strict except for one leniency: a trailing comma before ``}`` or ``]`` (as in
the seed's example) is accepted. Every problem raises :class:`ConfigError` (a ``ValueError``)
naming the field, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "KVCompConfig"]


class ConfigError(ValueError):
    """An invalid kvcomp config (or hash-weight file): the message names field, value, expectation."""


# JSON keys in the order to_json writes them (the seed's order first).
_KEY_ORDER = (
    "model_name",
    "is_mla",
    "hash_weight_type",
    "hash_weights_path",
    "seed",
    "num_hidden_layers",
    "seq_len_threshhold",
    "chunk_size",
    "chunk_repre_method",
    "head_dim",
    "hash_bits",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "hash_bits_kv_lora",
    "hash_bits_qk_rope",
    "top_k_ratio_per_layer",
    "top_k_index_reuse",
    "must_select_blocks",
    "top_k_budget_tokens",
    "query_aggregation",
    "token_score",
)
_KNOWN_KEYS = frozenset(_KEY_ORDER) | {"seq_len_threshold"}
_REQUIRED = ("model_name", "num_hidden_layers", "hash_bits", "top_k_ratio_per_layer")
_MLA_FIELDS = ("kv_lora_rank", "qk_rope_head_dim", "hash_bits_kv_lora", "hash_bits_qk_rope")
_HINTS = {
    "dense_layers": "there is no dense_layers field: set top_k_ratio_per_layer[i] = 1.0 "
    "for a dense layer",
}


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _need_int(name: str, v: Any, *, minimum: int | None = None, what: str = "an int") -> int:
    if not _is_int(v):
        raise ConfigError(f"{name}: expected {what}, got {_fmt(v)} ({type(v).__name__})")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{name}: expected {what}, got {v}")
    return v


def _need_choice(name: str, v: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in choices:
        opts = " | ".join(f'"{c}"' for c in choices)
        raise ConfigError(f"{name}: expected one of {opts}, got {_fmt(v)}")
    return v


def _need_bits(name: str, v: Any) -> int:
    if not _is_int(v) or v < 32 or v % 32:
        hint = ' (the "A+B" form is for MLA configs)' if isinstance(v, str) and "+" in v else ""
        raise ConfigError(f"{name}: expected a positive multiple of 32, got {_fmt(v)}{hint}")
    return v


def _strip_trailing_commas(text: str) -> str:
    """Replace each comma that is followed (after whitespace) by ``}`` or ``]`` with a space,
    outside strings. Positions are kept, so JSON error line/column numbers stay right."""
    out = list(text)
    in_str = False
    esc = False
    last_comma = -1
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
            last_comma = -1
        elif ch == ",":
            last_comma = i
        elif ch in "}]":
            if last_comma >= 0:
                out[last_comma] = " "
            last_comma = -1
        elif not ch.isspace():
            last_comma = -1
    return "".join(out)


@dataclass(frozen=True, kw_only=True)
class KVCompConfig:
    """A validated KVComp config; see the module docstring for every field.

    Instances are immutable: use :meth:`replace` for a validated modified copy.
    """

    model_name: str
    num_hidden_layers: int
    hash_bits: int
    top_k_ratio_per_layer: list[float]
    head_dim: int | None = None
    is_mla: bool = False
    hash_weight_type: str = "random"
    hash_weights_path: str | None = None
    seed: int = 0
    seq_len_threshold: int = 2048
    chunk_size: int = 128
    chunk_repre_method: str = "max"
    top_k_index_reuse: list[int] | None = None
    must_select_blocks: list[int] = field(default_factory=lambda: [0, -2, -1])
    top_k_budget_tokens: int | None = None
    query_aggregation: str = "sum"
    token_score: str = "hamming"
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    hash_bits_kv_lora: int | None = None
    hash_bits_qk_rope: int | None = None

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError(f"model_name: expected a non-empty string, got {_fmt(self.model_name)}")
        if not isinstance(self.is_mla, bool):
            raise ConfigError(f"is_mla: expected true or false, got {_fmt(self.is_mla)}")
        L = _need_int("num_hidden_layers", self.num_hidden_layers, minimum=1, what="an int >= 1")
        _need_choice("hash_weight_type", self.hash_weight_type, ("random", "trained"))
        path = self.hash_weights_path
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"hash_weights_path: expected a path string or null, got {_fmt(path)}")
        if path is not None:
            set_("hash_weights_path", os.fspath(path))
        if self.hash_weight_type == "trained" and not self.hash_weights_path:
            raise ConfigError(
                'hash_weights_path: required when hash_weight_type is "trained" '
                "(the safetensors file of the trained weights), got null"
            )
        if self.hash_weight_type == "random" and self.hash_weights_path is not None:
            raise ConfigError(
                f"hash_weights_path: given ({_fmt(self.hash_weights_path)}) but hash_weight_type "
                'is "random"; set hash_weight_type to "trained" to use these weights'
            )
        _need_int("seed", self.seed, minimum=0, what="an int >= 0")
        _need_int("seq_len_threshold", self.seq_len_threshold, minimum=0, what="an int >= 0")
        _need_int("chunk_size", self.chunk_size, minimum=1, what="an int >= 1")
        _need_choice("chunk_repre_method", self.chunk_repre_method, ("max", "mean", "lse"))
        _need_choice("query_aggregation", self.query_aggregation, ("sum", "majority", "mean"))
        _need_choice("token_score", self.token_score, ("hamming", "centered_norm"))
        if self.token_score == "centered_norm" and self.chunk_repre_method == "mean":
            raise ConfigError(
                'token_score: "centered_norm" scores blocks by their max token or the log-sum-exp '
                '(chunk_repre_method "max" or "lse"), got chunk_repre_method "mean"'
            )
        if self.is_mla and self.chunk_repre_method == "lse":
            raise ConfigError('chunk_repre_method: "lse" is for GQA models; MLA configs use "max" or "mean"')

        if self.is_mla and self.token_score != "hamming":
            raise ConfigError(
                f'token_score: "{self.token_score}" is for GQA models; MLA configs use "hamming"'
            )
        if self.head_dim is not None or not self.is_mla:
            if self.head_dim is None:
                raise ConfigError("head_dim: required (an int >= 1) unless is_mla is true")
            _need_int("head_dim", self.head_dim, minimum=1, what="an int >= 1")
        if self.top_k_budget_tokens is not None:
            _need_int("top_k_budget_tokens", self.top_k_budget_tokens, minimum=1,
                      what="an int >= 1 or null")
        self._validate_bits()
        set_("top_k_ratio_per_layer", self._validate_ratios(L))
        set_("top_k_index_reuse", self._validate_reuse(L))
        set_("must_select_blocks", self._validate_must_select())

    def _validate_bits(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        bits = self.hash_bits
        if not self.is_mla:
            for name in _MLA_FIELDS:
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"{name}: only used by MLA configs (is_mla true), got {_fmt(getattr(self, name))}"
                    )
            _need_bits("hash_bits", bits)
            return
        for name in ("kv_lora_rank", "qk_rope_head_dim"):
            if getattr(self, name) is None:
                raise ConfigError(f"{name}: required (an int >= 1) when is_mla is true")
            _need_int(name, getattr(self, name), minimum=1, what="an int >= 1")
        if isinstance(bits, str):
            parts = bits.replace(" ", "").split("+")
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ConfigError(
                    f'hash_bits: expected an int or "<latent bits>+<rope bits>" such as "512+64", '
                    f"got {_fmt(bits)}"
                )
            kv, rope = int(parts[0]), int(parts[1])
            for name, given, parsed in (("hash_bits_kv_lora", self.hash_bits_kv_lora, kv),
                                        ("hash_bits_qk_rope", self.hash_bits_qk_rope, rope)):
                if given is not None and given != parsed:
                    raise ConfigError(
                        f"{name}: {_fmt(given)} contradicts hash_bits {bits!r} (which says {parsed})"
                    )
            set_("hash_bits_kv_lora", kv)
            set_("hash_bits_qk_rope", rope)
        else:
            if self.hash_bits_kv_lora is None:
                set_("hash_bits_kv_lora", 512)
            if self.hash_bits_qk_rope is None:
                set_("hash_bits_qk_rope", 64)
        _need_bits("hash_bits_kv_lora", self.hash_bits_kv_lora)
        _need_bits("hash_bits_qk_rope", self.hash_bits_qk_rope)
        total = self.hash_bits_kv_lora + self.hash_bits_qk_rope
        if isinstance(bits, str):
            set_("hash_bits", total)
        else:
            _need_bits("hash_bits", bits)
            if bits != total:
                raise ConfigError(
                    f"hash_bits: {bits} != hash_bits_kv_lora + hash_bits_qk_rope "
                    f"({self.hash_bits_kv_lora} + {self.hash_bits_qk_rope} = {total})"
                )

    def _validate_ratios(self, L: int) -> list[float]:
        ratios = self.top_k_ratio_per_layer
        if not isinstance(ratios, (list, tuple)):
            raise ConfigError(f"top_k_ratio_per_layer: expected a list of {L} numbers, got {_fmt(ratios)}")
        if len(ratios) != L:
            raise ConfigError(
                f"top_k_ratio_per_layer: expected {L} entries (num_hidden_layers), got {len(ratios)}"
            )
        out = []
        for i, r in enumerate(ratios):
            if not _is_number(r) or not math.isfinite(r) or not 0 < r <= 1:
                raise ConfigError(
                    f"top_k_ratio_per_layer[{i}]: expected a number in (0, 1] (1.0 = dense layer), "
                    f"got {_fmt(r)}"
                )
            out.append(float(r))
        return out

    def _validate_reuse(self, L: int) -> list[int]:
        reuse = self.top_k_index_reuse
        if reuse is None:
            return [-1] * L
        if not isinstance(reuse, (list, tuple)):
            raise ConfigError(f"top_k_index_reuse: expected a list of {L} ints, got {_fmt(reuse)}")
        if len(reuse) != L:
            raise ConfigError(
                f"top_k_index_reuse: expected {L} entries (num_hidden_layers), got {len(reuse)}"
            )
        ratios = self.top_k_ratio_per_layer
        for i, j in enumerate(reuse):
            name = f"top_k_index_reuse[{i}]"
            if not _is_int(j):
                raise ConfigError(f"{name}: expected -1 or an earlier layer index, got {_fmt(j)}")
            if j == -1:
                continue
            if not 0 <= j < i:
                raise ConfigError(
                    f"{name}: expected -1 or an earlier layer 0 <= j < {i}, got {j}"
                )
            if ratios[i] == 1.0:
                raise ConfigError(
                    f"{name}: layer {i} is dense (ratio 1.0) so it cannot reuse layer {j}'s "
                    f"selection; got {j}"
                )
            if reuse[j] != -1:
                raise ConfigError(
                    f"{name}: layer {j} reuses layer {reuse[j]} itself; point to a layer that "
                    f"computes its own selection, got {j}"
                )
            if ratios[j] == 1.0:
                raise ConfigError(
                    f"{name}: layer {j} is dense (ratio 1.0) and selects nothing to reuse; got {j}"
                )
            if ratios[j] != ratios[i]:
                raise ConfigError(
                    f"{name}: layer {i} reuses layer {j}'s selection, so its ratio must equal "
                    f"layer {j}'s ({ratios[j]}); top_k_ratio_per_layer[{i}] is {ratios[i]}"
                )
        return list(reuse)

    def _validate_must_select(self) -> list[int]:
        must = self.must_select_blocks
        if not isinstance(must, (list, tuple)):
            raise ConfigError(f"must_select_blocks: expected a list of ints, got {_fmt(must)}")
        for i, m in enumerate(must):
            if not _is_int(m):
                raise ConfigError(
                    f"must_select_blocks[{i}]: expected an int block index, got {_fmt(m)}"
                )
        if len(set(must)) != len(must):
            raise ConfigError(f"must_select_blocks: duplicate entries in {list(must)}")
        if -1 not in must:
            raise ConfigError(
                f"must_select_blocks: must contain -1 (the last, partial block holds the newest "
                f"tokens and is always attended), got {list(must)}"
            )
        return list(must)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict, *, base_dir: str | os.PathLike | None = None) -> KVCompConfig:
        """Build from a dict with the JSON keys. ``base_dir``: folder that a relative
        ``hash_weights_path`` is resolved against (from_json passes the file's folder)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a JSON object (dict), got {type(d).__name__}")
        unknown = [k for k in d if k not in _KNOWN_KEYS]
        if unknown:
            msgs = []
            for k in unknown:
                if k in _HINTS:
                    msgs.append(f"{k!r} ({_HINTS[k]})")
                    continue
                close = difflib.get_close_matches(str(k), sorted(_KNOWN_KEYS), n=1, cutoff=0.6)
                msgs.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown key(s): {', '.join(msgs)}")
        kw = dict(d)
        if "seq_len_threshhold" in kw and "seq_len_threshold" in kw:
            a, b = kw["seq_len_threshhold"], kw["seq_len_threshold"]
            if a != b or type(a) is not type(b):
                raise ConfigError(
                    f"seq_len_threshold: given twice with different values "
                    f"(seq_len_threshhold={_fmt(a)}, seq_len_threshold={_fmt(b)})"
                )
        if "seq_len_threshhold" in kw:
            kw["seq_len_threshold"] = kw.pop("seq_len_threshhold")
        missing = [k for k in _REQUIRED if k not in kw]
        if kw.get("is_mla") is not True and "head_dim" not in kw:
            missing.append("head_dim")
        if kw.get("is_mla") is True:
            missing += [k for k in ("kv_lora_rank", "qk_rope_head_dim") if k not in kw]
        if missing:
            raise ConfigError(f"missing required key(s): {', '.join(missing)}")
        path = kw.get("hash_weights_path")
        if base_dir is not None and isinstance(path, str) and path and not os.path.isabs(path):
            kw["hash_weights_path"] = str(Path(base_dir) / path)
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> KVCompConfig:
        """Read a JSON config file (trailing commas before ``}``/``]`` accepted)."""
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {os.fspath(path)}")
        if not p.is_file():
            raise ConfigError(f"config path is not a file: {os.fspath(path)}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {os.fspath(path)}: cannot read it ({e})") from None
        try:
            data = json.loads(_strip_trailing_commas(text))
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{os.fspath(path)}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
            ) from None
        return cls.from_dict(data, base_dir=p.resolve().parent)

    def to_dict(self) -> dict:
        """The JSON dict (seed key spelling, keys with null values left out)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["seq_len_threshhold"] = values.pop("seq_len_threshold")
        out = {}
        for k in _KEY_ORDER:
            v = values[k]
            if v is None:
                continue
            out[k] = list(v) if isinstance(v, (list, tuple)) else v
        return out

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the config as JSON in the seed's layout: one key per line, lists on one line,
        the seed's key spelling."""
        items = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in self.to_dict().items()]
        Path(path).write_text("{\n" + ",\n".join(items) + "\n}\n", encoding="utf-8")

    def replace(self, **changes) -> KVCompConfig:
        """A validated copy with the given fields changed (Python field names)."""
        unknown = [k for k in changes if k not in {f.name for f in dataclasses.fields(self)}]
        if unknown:
            raise ConfigError(f"replace(): unknown field(s) {', '.join(map(repr, unknown))}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def default(
        cls,
        model_name: str,
        num_hidden_layers: int,
        head_dim: int,
        *,
        ratio: float = 0.1,
        dense_layers: int = 2,
        chunk_size: int = 128,
        bits: int = 128,
        threshold: int = 2048,
        must_select=(0, -2, -1),
        **extra,
    ) -> KVCompConfig:
        """The integration's default for a GQA model: the first ``dense_layers`` layers dense,
        every other layer selects ``ratio`` of its blocks. ``extra``: any other field."""
        L = _need_int("num_hidden_layers", num_hidden_layers, minimum=1, what="an int >= 1")
        nd = _need_int("dense_layers", dense_layers, minimum=0, what="an int >= 0")
        return cls(
            model_name=model_name,
            num_hidden_layers=L,
            head_dim=head_dim,
            hash_bits=bits,
            chunk_size=chunk_size,
            seq_len_threshold=threshold,
            must_select_blocks=list(must_select),
            top_k_ratio_per_layer=[1.0 if i < nd else ratio for i in range(L)],
            **extra,
        )

    @classmethod
    def default_mla(
        cls,
        model_name: str,
        num_hidden_layers: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        *,
        ratio: float = 0.1,
        dense_layers: int = 2,
        chunk_size: int = 128,
        bits_kv: int = 512,
        bits_rope: int = 64,
        threshold: int = 2048,
        must_select=(0, -2, -1),
        **extra,
    ) -> KVCompConfig:
        """The integration's default for an MLA model (split hash ``bits_kv + bits_rope``)."""
        L = _need_int("num_hidden_layers", num_hidden_layers, minimum=1, what="an int >= 1")
        nd = _need_int("dense_layers", dense_layers, minimum=0, what="an int >= 0")
        total = f"{bits_kv}+{bits_rope}"
        return cls(
            model_name=model_name,
            is_mla=True,
            num_hidden_layers=L,
            kv_lora_rank=kv_lora_rank,
            qk_rope_head_dim=qk_rope_head_dim,
            hash_bits=total,
            chunk_size=chunk_size,
            seq_len_threshold=threshold,
            must_select_blocks=list(must_select),
            top_k_ratio_per_layer=[1.0 if i < nd else ratio for i in range(L)],
            **extra,
        )

    # ------------------------------------------------------------------ description
    @property
    def dense_layer_indices(self) -> list[int]:
        """Layers with ratio 1.0."""
        return [i for i, r in enumerate(self.top_k_ratio_per_layer) if r == 1.0]

    def summary(self) -> str:
        """One line: model, layers, sparse/dense/reuse counts, ratio range or budget, chunk,
        bits, threshold."""
        ratios = self.top_k_ratio_per_layer
        sparse = [r for r in ratios if r < 1.0]
        n_reuse = sum(1 for j in self.top_k_index_reuse if j != -1)
        n_dense = len(ratios) - len(sparse)
        if not sparse:
            sel = "no sparse layer"
        elif self.top_k_budget_tokens is not None:
            sel = f"budget {self.top_k_budget_tokens} tokens"
        elif min(sparse) == max(sparse):
            sel = f"ratio {min(sparse):g}"
        else:
            sel = f"ratio {min(sparse):g}-{max(sparse):g}"
        if self.is_mla:
            bits = f"{self.hash_bits_kv_lora}+{self.hash_bits_qk_rope} bits (MLA)"
        else:
            bits = f"{self.hash_bits} bits"
        return (
            f"{self.model_name}: {self.num_hidden_layers} layers ({len(sparse) - n_reuse} compute, "
            f"{n_reuse} reuse, {n_dense} dense), {sel}, chunk {self.chunk_size}, {bits}, "
            f"{self.hash_weight_type} hashes, threshold {self.seq_len_threshold}, "
            f"must-select {self.must_select_blocks}"
            + (f", token score {self.token_score}" if self.token_score != "hamming" else "")
        )
