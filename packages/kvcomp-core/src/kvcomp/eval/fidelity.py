"""Attention fidelity per layer: how much of the true attention a selection keeps.

For every layer, window position t and selection method at a budget (ratio of blocks):

* captured mass: the share of the kv-head's group-summed softmax mass (dense attention over
  keys 0..t) that falls inside the selected blocks, averaged over kv-heads; 1.0 = lossless.
* output relative error: ``||o_sel - o|| / ||o||`` with ``o`` the dense attention output and
  ``o_sel`` the exact attention over the selected blocks only (softmax renormalised over
  them), averaged over query heads.

Methods: hash selections (named weight sets x query aggregation modes, e.g. random / trained x
sum / majority / mean) and the oracle (the top blocks by true mass, same must-select blocks,
same count). The probe rides on a dense window pass (``kvcomp.eval.window``) so every layer
sees the dense model's hidden states; results keep one value per position so standard errors
are over positions.

Values are filed under the document being observed (``probe.document``, set by
``kvcomp.eval.nll``) and read in document order, so probes that observed disjoint documents (one
per process) merge into exactly the probe of one process: ``probe.merge_state(other.state())``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvcomp.eval import selection as sel
from kvcomp.eval.window import layer_weight


@dataclass
class HashMethod:
    name: str  # e.g. "trained-sum"
    weights: object  # HashWeights or per-layer [Hkv, D, BITS] list
    query_mode: str = "sum"
    token_score: str = "hamming"  # or "centered_norm" (KVCompConfig.token_score)


@dataclass
class FidelityProbe:
    methods: list[HashMethod]
    ratios: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    chunk_size: int = 16
    must_select: tuple[int, ...] = (0, -2, -1)
    chunk_repre: str = "max"
    oracle: bool = True
    error_ratios: tuple[float, ...] | None = None  # budgets with output error (None = all)
    # (method, ratio) -> layer -> document -> list of per-position tensors (observation order)
    mass: dict = field(default_factory=dict)
    error: dict = field(default_factory=dict)
    document: int = 0  # the document being observed
    _codes: dict = field(default_factory=dict)

    def method_names(self) -> list[str]:
        return [m.name for m in self.methods] + (["oracle"] if self.oracle else [])

    def prepare_layer(self, layer: int, k: torch.Tensor, prefix_len: int | None = None) -> None:
        """k [Hkv, L, D]: encode the layer's keys once per (weight set, token score);
        ``prefix_len``: the prefill length (the centring mean of "centered_norm")."""
        self._codes = {}
        for m in self.methods:
            key = (id(m.weights), m.token_score)
            if key not in self._codes:
                w = layer_weight(m.weights, layer).to(k.device)
                self._codes[key] = (w, *sel.key_codes(k, w, m.token_score, prefix_len))

    def _record(self, store: dict, method: str, ratio: float, layer: int, values: torch.Tensor):
        per_doc = store.setdefault((method, ratio), {}).setdefault(layer, {})
        per_doc.setdefault(self.document, []).append(values.cpu())

    def state(self) -> dict:
        """The observed values ({"mass": ..., "error": ...}, CPU tensors), e.g. to send to
        another process."""
        return {"mass": self.mass, "error": self.error}

    def merge_state(self, state: dict) -> None:
        """Add the values another probe (same methods and budgets) observed on other documents."""
        for name in ("mass", "error"):
            mine = getattr(self, name)
            for key, per_layer in state[name].items():
                for layer, per_doc in per_layer.items():
                    dst = mine.setdefault(key, {}).setdefault(layer, {})
                    clash = set(dst) & set(per_doc)
                    if clash:
                        raise ValueError(f"merge_state: documents {sorted(clash)} were observed twice")
                    dst.update(per_doc)

    def observe(self, layer, q, k, v, p, seq_lens) -> None:
        """q [c, Hq, D], k/v [Hkv, L, D], p [c, Hq, L] dense softmax rows, seq_lens [c]."""
        c, Hq, L = p.shape
        Hkv = k.shape[0]
        G = Hq // Hkv
        C = self.chunk_size
        nb = -(-L // C)
        pad = nb * C - L
        pp = torch.nn.functional.pad(p, (0, pad)).view(c, Hq, nb, C)
        vv = torch.nn.functional.pad(v.repeat_interleave(G, 0), (0, 0, 0, pad)).view(Hq, nb, C, -1)
        part = torch.einsum("chnt,hntd->chnd", pp, vv)  # [c, Hq, NB, Dv] per-block partial outputs
        head_mass = pp.sum(-1)  # [c, Hq, NB]
        o = part.sum(2)  # [c, Hq, Dv] dense output
        o_norm = o.norm(dim=-1).clamp(min=1e-30)
        grp_mass = head_mass.view(c, Hkv, G, nb).sum(2)  # [c, Hkv, NB]

        def score(block_idx, method, ratio):
            hit = torch.zeros(c, Hkv, nb + 1, dtype=torch.float32, device=p.device)
            slot = torch.where(block_idx >= 0, block_idx.long(), torch.full_like(block_idx, nb).long())
            hit.scatter_(2, slot, 1.0)
            hit = hit[..., :nb]  # [c, Hkv, NB]
            captured = (grp_mass * hit).sum(-1) / G  # [c, Hkv]
            self._record(self.mass, method, ratio, layer, captured.mean(1))
            if self.error_ratios is not None and ratio not in self.error_ratios:
                return
            hq = hit.repeat_interleave(G, 1)  # [c, Hq, NB]
            m_sel = (head_mass * hq).sum(-1).clamp(min=1e-30)  # [c, Hq]
            o_sel = torch.einsum("chn,chnd->chd", hq, part) / m_sel.unsqueeze(-1)
            err = (o_sel - o).norm(dim=-1) / o_norm  # [c, Hq]
            self._record(self.error, method, ratio, layer, err.mean(1))

        for m in self.methods:
            w, k_codes, k_norms = self._codes[(id(m.weights), m.token_score)]
            from kvcomp.ops.query_codes import encode_query

            q_codes = encode_query(q.contiguous(), w, m.query_mode)
            raw = sel.code_token_scores(q_codes, k_codes)
            if self.chunk_repre == "lse":
                tok = sel.lse_logits(raw, q, q_codes.shape[1] // k_codes.shape[0], w.shape[-1], k_norms)
            else:
                tok = sel.scale_scores(raw, k_norms)
            for r in self.ratios:
                bi = sel.select_from_token_scores(tok, seq_lens, r, chunk_size=C,
                                                  must_select=self.must_select,
                                                  chunk_repre=self.chunk_repre)
                score(bi, m.name, r)
        if self.oracle:
            for r in self.ratios:
                bi = sel.select_from_block_scores(grp_mass, seq_lens, r, chunk_size=C,
                                                  must_select=self.must_select)
                score(bi, "oracle", r)

    # ------------------------------------------------------------------ results
    def per_position(self, store: dict, method: str, ratio: float, layers) -> torch.Tensor:
        """[positions, len(layers)] values (positions in document order, then observation order)."""
        per_layer = store[(method, ratio)]
        return torch.stack([torch.cat([t for d in sorted(per_layer[layer]) for t in per_layer[layer][d]])
                            for layer in layers], dim=1)

    def summary(self, sparse_layers) -> dict:
        """{method: {ratio: {mass, mass_se, error, error_se, per_layer_mass, per_layer_error}}}:
        means over positions of the average over ``sparse_layers``; se over positions."""
        sparse_layers = sorted(sparse_layers)
        all_layers = sorted(next(iter(self.mass.values())).keys()) if self.mass else []
        out: dict = {}
        for method in self.method_names():
            out[method] = {}
            for r in self.ratios:
                entry = {}
                for key, store in (("mass", self.mass), ("error", self.error)):
                    if (method, r) not in store:
                        continue
                    x = self.per_position(store, method, r, sparse_layers).mean(1).double()
                    entry[key] = float(x.mean())
                    entry[f"{key}_se"] = float(x.std() / math.sqrt(max(1, x.numel())))
                    full = self.per_position(store, method, r, all_layers).double().mean(0)
                    entry[f"per_layer_{key}"] = {int(layer): float(full[i]) for i, layer in enumerate(all_layers)}
                entry["positions"] = int(self.per_position(self.mass, method, r, sparse_layers).shape[0])
                out[method][str(r)] = entry
        return out
