"""MLA block selection: ``hamming_topk`` for one latent kv-head and G = all H query heads,
computed through the heads' per-bit count vector instead of H popcounts per word.

    block_idx = mla_select(q_codes, k_codes, seq_lens, k_blocks=..., chunk_size=128,
                           must_select=(0, -2, -1), chunk_repre="max")
        q_codes   [B, H, W]        int32 per-head query codes (W = BITS // 32; 18 for 512+64)
        k_codes   [B, 1, Lmax, W]  int32 latent key-code cache; rows t >= seq_lens[b] ignored
        seq_lens  [B]              int real lengths
        block_idx [B, 1, K]        int32, equal to ``hamming_topk`` on the same inputs

Identity (exact): with n_b the number of heads whose code has bit b set,
    sum_h (BITS - 2 Ham(q_h, k)) = sum_b (2 n_b - H)(2 k_b - 1)
                                 = 4 sum_b n_b k_b - 2 H popc(k) + (H BITS - 2 sum_b n_b)
and sum_b n_b k_b = sum_j 2^j popc(N_j & k) over the bit-planes N_j of n (bit_length(H) planes).
Per 32-bit key word that is bit_length(H) + 1 popcounts (9 at H = 128) instead of H (128).
The Triton kernel fuses token scores and the per-block max; the top-k runs on block scores
with a composite int64 key (score, then lower block index) so ties resolve as in the
reference. ``chunk_repre="mean"`` and non-Triton tensors go through ``hamming_topk`` itself.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import device_guard, interpreting, unpack_bits, use_triton
from kvcomp.ops.hamming_topk import _prepare, hamming_topk
from kvcomp.ops.hamming_topk.reference import select_blocks_ref

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - triton is an optional extra of kvcomp-core
    triton = None

__all__ = ["mla_select", "count_planes", "block_scores_from_planes"]

_SENTINEL = -(2**31) + 1  # block score of a block with no valid token


def count_planes(q_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q_codes [B, H, W] int32 -> (planes int32 [B, NPL, W], const int32 [B]).

    planes[b, j] packs bit j of n_b (the number of heads with bit b set), NPL =
    bit_length(H); const[b] = H * BITS - 2 * sum_b n_b (the score part that no key changes)."""
    B, H, W = q_codes.shape
    n = unpack_bits(q_codes).sum(1, dtype=torch.int32)  # [B, BITS]
    npl = max(1, int(H).bit_length())
    shifts = torch.arange(npl, device=q_codes.device, dtype=torch.int32).view(1, npl, 1)
    bits = ((n.unsqueeze(1) >> shifts) & 1).view(B, npl, W, 32)  # [B, NPL, W, 32]
    weights = torch.ones(32, dtype=torch.int64, device=q_codes.device) << torch.arange(
        32, device=q_codes.device
    )
    words = (bits.to(torch.int64) * weights).sum(-1)
    planes = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    const = (H * 32 * W - 2 * n.sum(-1)).to(torch.int32)
    return planes.contiguous(), const


if triton is not None:

    @triton.jit
    def _popc32(x, NATIVE: tl.constexpr):
        if NATIVE:
            return libdevice.popc(x)
        # SWAR popcount (the interpreter's libdevice.popc returns None)
        v = x.to(tl.uint32, bitcast=True)
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        v = (v * 0x01010101) >> 24
        return v.to(tl.int32)

    @triton.jit
    def _piece_dot(KC, PLANES, tok_off, valid, w0, s_kw, s_pj, W_PIECE: tl.constexpr,
                   W_REAL, NPL: tl.constexpr, NATIVE: tl.constexpr):
        """(sum_j 2^j popc(N_j & k), popc(k)) over words [w0, w0 + W_REAL) of each token."""
        offs_w = w0 + tl.arange(0, W_PIECE)  # [W_PIECE]
        mask_w = tl.arange(0, W_PIECE) < W_REAL
        k = tl.load(KC + tok_off[:, None] + offs_w[None, :] * s_kw,
                    mask=valid[:, None] & mask_w[None, :], other=0)  # [BLOCK_T, W_PIECE]
        pk = tl.sum(_popc32(k, NATIVE), axis=1)  # [BLOCK_T]
        dot = tl.zeros_like(pk)
        for j in tl.static_range(NPL):
            pl = tl.load(PLANES + j * s_pj + offs_w, mask=mask_w, other=0)  # [W_PIECE]
            dot += tl.sum(_popc32(k & pl[None, :], NATIVE), axis=1) << j
        return dot, pk

    @triton.jit
    def _mla_block_scores_kernel(
        KC, PLANES, CONST, SEQ_LENS, OUT,
        H, chunk_size, n_blocks,
        s_kb, s_kl, s_kw,
        s_pb, s_pj,
        s_ob,
        W_HI: tl.constexpr, W_LO: tl.constexpr, W_LO_REAL,
        NPL: tl.constexpr, BLOCK_NB: tl.constexpr, CHUNK_TILE: tl.constexpr,
        NATIVE: tl.constexpr,
    ):
        """OUT[b, blk] = max over the block's valid tokens of the group-summed score."""
        pid_n = tl.program_id(0).to(tl.int64)
        pid_b = tl.program_id(1).to(tl.int64)
        seq_len = tl.load(SEQ_LENS + pid_b).to(tl.int64)
        cst = tl.load(CONST + pid_b)
        BLOCK_T: tl.constexpr = BLOCK_NB * CHUNK_TILE
        r = tl.arange(0, BLOCK_T)
        blk = pid_n * BLOCK_NB + r // CHUNK_TILE  # [BLOCK_T]
        c = r % CHUNK_TILE
        best = tl.full([BLOCK_NB], -(2**31) + 1, dtype=tl.int32)
        kc = KC + pid_b * s_kb
        pl = PLANES + pid_b * s_pb
        for c0 in range(0, chunk_size, CHUNK_TILE):
            tok = blk * chunk_size + c0 + c
            valid = (c0 + c < chunk_size) & (tok < seq_len) & (blk < n_blocks)
            tok_off = tok * s_kl
            dot, pk = _piece_dot(kc, pl, tok_off, valid, 0, s_kw, s_pj, W_HI, W_HI, NPL, NATIVE)
            if W_LO > 0:
                d2, p2 = _piece_dot(kc, pl, tok_off, valid, W_HI, s_kw, s_pj, W_LO, W_LO_REAL,
                                    NPL, NATIVE)
                dot += d2
                pk += p2
            score = 4 * dot - 2 * H * pk + cst
            score = tl.where(valid, score, -(2**31) + 1)
            best = tl.maximum(best, tl.max(tl.reshape(score, [BLOCK_NB, CHUNK_TILE]), axis=1))
        offs_nb = pid_n * BLOCK_NB + tl.arange(0, BLOCK_NB)
        tl.store(OUT + pid_b * s_ob + offs_nb, best, mask=offs_nb < n_blocks)


def block_scores_from_planes(
    k_codes: torch.Tensor,
    planes: torch.Tensor,
    const: torch.Tensor,
    seq_lens: torch.Tensor,
    H: int,
    chunk_size: int,
) -> torch.Tensor:
    """Triton: k_codes [B, 1, Lmax, W] + count planes -> int32 [B, NB] "max" block scores
    (NB = ceil(Lmax / chunk_size); blocks past seq_lens hold -(2**31) + 1)."""
    B, _, L, W = k_codes.shape
    nb = triton.cdiv(L, chunk_size)
    out = torch.empty(B, nb, dtype=torch.int32, device=k_codes.device)
    w_hi = 1 << (W.bit_length() - 1)
    w_lo_real = W - w_hi
    w_lo = triton.next_power_of_2(w_lo_real) if w_lo_real else 0
    chunk_tile = min(triton.next_power_of_2(chunk_size), 64)
    block_nb = max(1, 64 // chunk_tile)
    native = k_codes.is_cuda and not interpreting()
    grid = (triton.cdiv(nb, block_nb), B)
    _mla_block_scores_kernel[grid](
        k_codes, planes, const, seq_lens, out,
        H, chunk_size, nb,
        k_codes.stride(0), k_codes.stride(2), k_codes.stride(3),
        planes.stride(0), planes.stride(1),
        out.stride(0),
        W_HI=w_hi, W_LO=w_lo, W_LO_REAL=w_lo_real,
        NPL=planes.shape[1], BLOCK_NB=block_nb, CHUNK_TILE=chunk_tile, NATIVE=native,
        num_warps=4,
    )
    return out


def select_from_block_scores(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    k_blocks: torch.Tensor,
    K: int,
    chunk_size: int,
    must_select: tuple[int, ...],
) -> torch.Tensor:
    """int32 [B, NB] block scores -> int32 [B, 1, K], the selection rule of ``hamming_topk``
    (must-select first, then best scores, lower index on ties, ascending, -1 padding)."""
    # one selection rule in the project: the reference's (exact on float64 keys)
    return select_blocks_ref(
        scores.unsqueeze(1).to(torch.float64), seq_lens, k_blocks, K, chunk_size, must_select
    )


def mla_select(
    q_codes: torch.Tensor,
    k_codes: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    k_blocks,
    chunk_size: int = 128,
    must_select=(0, -2, -1),
    chunk_repre: str = "max",
    max_blocks: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    must, kb, K = _prepare(
        q_codes, k_codes, seq_lens, k_blocks, chunk_size, must_select, chunk_repre, max_blocks
    )
    if k_codes.shape[1] != 1:
        raise ValueError(f"mla_select needs one latent kv-head: k_codes {tuple(k_codes.shape)}")
    H = q_codes.shape[1]
    fast = (
        triton is not None
        and chunk_repre == "max"
        and H * 32 * q_codes.shape[2] < 2**30  # scores fit int32 with room for 4 * dot
        and -(-k_codes.shape[2] // chunk_size) < 2**22  # block index fits the top-k key
        and use_triton(backend, q_codes, k_codes, seq_lens)
    )
    if not fast:
        return hamming_topk(
            q_codes, k_codes, seq_lens, k_blocks=k_blocks, chunk_size=chunk_size,
            must_select=must, chunk_repre=chunk_repre, max_blocks=max_blocks, backend=backend,
        )
    if not isinstance(kb, torch.Tensor):
        kb = torch.full((q_codes.shape[0],), int(kb), dtype=torch.int32, device=q_codes.device)
    kb, seq_lens = kb.contiguous(), seq_lens.contiguous()  # the kernels read [b] at unit stride
    with device_guard(q_codes):
        planes, const = count_planes(q_codes)
        scores = block_scores_from_planes(k_codes, planes, const, seq_lens, H, chunk_size)
        return select_from_block_scores(scores, seq_lens, kb, K, chunk_size, must)
