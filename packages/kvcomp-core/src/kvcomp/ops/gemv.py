"""``gemv``: ``F.linear`` for decode-sized inputs (a few rows) as one weight-streaming kernel.

In a decode step every projection is a matrix-vector product: x [M, K] with M = batch (1-8)
against a bf16 weight [N, K] that is read once from HBM. The step is bound by those weight
bytes (15 GB per step for Qwen3-8B); cuBLAS reaches ~3.2 TB/s on them in a CUDA-graph step
(``docs/benchmarks/e2e.md``), against ~4.3 TB/s of device copy bandwidth. This kernel streams
the weight in [BLOCK_N, BLOCK_K] tiles, BLOCK_N output features per program, the whole K in
one program (no split-K reduction kernel, no atomics: deterministic), accumulating in fp32.

    gemv(x, weight, bias=None, residual=None)
                                 x [..., K], weight [N, K], bias [N] or None -> [..., N]
                                 = F.linear(x, weight, bias) up to fp32 summation order
                                 (products of the inputs' dtype, exact in fp32; the sum and
                                 the bias in fp32; one rounding to the output dtype); with
                                 residual [..., N]: residual + that, the sum in fp32 of the
                                 two rounded values, rounded again (what ``residual +
                                 F.linear(...)`` computes in torch), in the same kernel;
                                 with norm = (nw [K], eps): x RMS-normalised first,
                                 nw * x * rsqrt(mean(x^2) + eps) in fp32 (an RMSNorm module
                                 in front of the projection, without the module's two
                                 roundings to x's dtype; the dot-form tiles round the
                                 normalised x once, to the weight's dtype)
    gemv(x, weight, gated=True)  weight [2I, K] = [gate; up] (a merged gate|up projection) ->
                                 [..., I] = silu_mul(y[..., :I], y[..., I:]) of that y (each
                                 half rounded, then ``kvcomp.ops.silu_mul``'s math) in the
                                 epilogue: each program streams matching gate and up rows, so
                                 the 2I outputs are never written and no second launch reads
                                 them
    gemv(..., early=True)        the same result; the weight's first EARLY_TILES K tiles are
                                 read before the kernel waits for its predecessor (programmatic
                                 dependent launch), for a weight complete before that
                                 predecessor was launched (a model's parameters in a decode
                                 step; one-row inputs: ``EARLY_MAX_ROWS``). Bit-identical,
                                 except with ``norm`` on the tensor-core tiles (several rows),
                                 whose sum of squares is reduced across threads in an order
                                 that follows the compiler's layout (fp32 on the H200: 1.9e-6)

Two tile forms (``GEMV_CONFIG`` / ``GEMV_CONFIG_ONE_ROW``; both tested): ``dot`` multiplies the tile with tl.dot
(x's rows padded to 16, tensor cores; any M) and ``fma`` multiplies elementwise on CUDA cores
(M <= 4; at M = 1 the K axis is reduced once, at the end). Rows of x beyond ``MAX_ROWS`` are the caller's
business (``kvcomp.fusion.FusedDecode`` sends prefill to F.linear).

The weight must have a contiguous last dim; x any strides with a contiguous last dim.
"""

from __future__ import annotations

import torch

from kvcomp.ops._common import FLOAT_DTYPES, check_tensor, device_guard, interpreting, use_triton

__all__ = ["gemv", "gemv_ref", "GEMV_CONFIG", "GEMV_CONFIG_ONE_ROW", "MAX_ROWS"]

try:
    import triton
    import triton.language as tl

    from kvcomp.ops._pdl import pdl_args, pdl_enter
except ImportError:  # pragma: no cover - the reference still works
    triton = None

MAX_ROWS = 16
# launch configuration: form ("dot" | "fma"), output features per program, K per tile, warps,
# pipeline stages. From the H200 sweep of tools/experiments/gemv_sweep.py over Qwen3-8B's merged
# projections (docs/benchmarks/e2e.md): one row runs best as many short CUDA-core programs
# (q|k|v 14.6 us, down 25.4, gate|up 48.9 against 15.7 / 27.6 / 50.1 with the tensor-core
# tiles), more rows on tensor-core tiles.
GEMV_CONFIG = dict(form="dot", block_n=32, block_k=256, num_warps=4, num_stages=4)
GEMV_CONFIG_ONE_ROW = dict(form="fma", block_n=4, block_k=1024, num_warps=4, num_stages=3)
# ``gemv(early=True)`` loads the weight's first K tile before the PDL wait (False: after it, as
# without ``early``; the e2e experiments time both), for inputs of up to EARLY_MAX_ROWS rows.
# H200, Qwen3-8B-shaped decode step with every projection early (session 14, docs/benchmarks/
# e2e.md): one row (the CUDA-core tiles) 4.74-4.75 against 4.91 ms for kvcomp at 128K and 8.70
# against 8.81 for dense_kv; four rows (tensor-core tiles) 6.05 against 5.96 ms at 64K: one row only
EARLY_WEIGHT = True
EARLY_MAX_ROWS = 1
# K tiles loaded before the wait (1 or 2): two took kvcomp's step at 128K, B = 1 to 4.70 against
# 4.74-4.75 ms with one (dense_kv 8.71 / 8.70; the same session)
EARLY_TILES = 2
# gated tensor-core tiles: gate and up rows stacked in one [2 * block_n, block_k] tile and one
# dot, like the plain tiles (False: two [block_n, block_k] tiles and dots; a 16-row output does
# not split over 4 warps, so every warp ran all of both dots: 64 mma.sync a K tile against 16)
GATED_STACKED = True


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             residual: torch.Tensor | None = None, norm: tuple | None = None,
             gated: bool = False) -> torch.Tensor:
    """fp32 accumulation of x @ weight.T (+ bias), rounded once to x's dtype (+ residual);
    with ``norm = (norm_weight, eps)`` x is RMS-normalised first, in fp32; ``gated``: the
    halves through ``silu_mul`` (module doc)."""
    x32 = x.to(torch.float32)
    if norm is not None:
        x32 = norm[0].to(torch.float32) * x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm[1])
    y = x32 @ weight.to(torch.float32).T
    if bias is not None:
        y = y + bias.to(torch.float32)
    y = y.to(x.dtype)
    if gated:
        from kvcomp.ops.norm_act import silu_mul_ref

        n = y.shape[-1] // 2
        y = silu_mul_ref(y[..., :n], y[..., n:])
    return y if residual is None else residual + y


if triton is not None:

    @triton.jit
    def _gemv_weight_tile(w_rows, kk, n_ok, K, up_off, GATED: tl.constexpr):
        """The weight tile of columns kk ([BLOCK_N, BLOCK_K], zeros outside) and, with GATED,
        the matching up tile (rows + up_off elements; else the same tile again)."""
        mask = n_ok[:, None] & (kk < K)[None, :]
        w = tl.load(w_rows + kk[None, :], mask=mask, other=0.0)
        if GATED:
            wu = tl.load(w_rows + up_off + kk[None, :], mask=mask, other=0.0)
        else:
            wu = w
        return w, wu

    @triton.jit
    def _gemv_accumulate(acc, acc_u, ss, w, wu, x_rows, nw_ptr, kk, k_ok, m_ok,
                         DOT: tl.constexpr, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
                         HAS_NORM: tl.constexpr, GATED: tl.constexpr):
        """One K tile of ``_gemv_kernel``: x's tile loaded (normalised with HAS_NORM), its
        products with the weight tile w (and the up tile wu with GATED) added to the
        accumulators of the tile form (acc: [BLOCK_N, BLOCK_M] for DOT, [BLOCK_N, BLOCK_K] for
        one row of FMA, else [BLOCK_M, BLOCK_N]; acc_u the same with GATED, else unused; ss the
        running sum of squares with HAS_NORM, else unused)."""
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_NORM:
            xf = x.to(tl.float32)
            ss += xf * xf
            xf = xf * tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if DOT and not DOT_F32:
                x = xf.to(w.dtype)  # the tensor cores take the weight's dtype
            else:
                x = xf
        if DOT_F32:  # the interpreter's bf16 tl.dot is wrong (triton 3.9): same math in fp32
            acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc)
            if GATED:
                acc_u = tl.dot(wu.to(tl.float32), tl.trans(x.to(tl.float32)), acc_u)
        elif DOT and IEEE:  # fp32 inputs: no tf32 rounding
            acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
            if GATED:
                acc_u = tl.dot(wu, tl.trans(x), acc_u, input_precision="ieee")
        elif DOT:
            acc = tl.dot(w, tl.trans(x), acc)
            if GATED:
                acc_u = tl.dot(wu, tl.trans(x), acc_u)
        elif BLOCK_M == 1:
            acc += x.to(tl.float32) * w.to(tl.float32)
            if GATED:
                acc_u += x.to(tl.float32) * wu.to(tl.float32)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)
            if GATED:
                acc_u += tl.sum(x.to(tl.float32)[:, None, :] * wu.to(tl.float32)[None, :, :], 2)
        return acc, acc_u, ss

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, N, K, sxm, swn, srm, sym,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
        nw_ptr=None, eps=0.0, HAS_NORM: tl.constexpr = False, PDL: tl.constexpr = False,
        GATED: tl.constexpr = False, EARLY: tl.constexpr = 0, STACKED: tl.constexpr = False,
        TWO_TILES: tl.constexpr = False, ROWS: tl.constexpr = 16,
    ):
        """Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)): y[m, n] = sum_k x[m, k] w[n, k] (+ b[n])
        (+ r[m, n] after rounding to y's dtype). With HAS_NORM, x[m, k] is nw[k] x[m, k]
        rsqrt(mean_k x[m, k]^2 + eps): each program sums the squares of the rows it streams
        anyway and scales its dot products by the row's factor at the end. PDL: programmatic
        dependent launch (``kvcomp.ops._pdl``). GATED: w is [2N, K] = [gate; up]; the program
        also streams the up rows N + rn and stores silu(gate) * up (``silu_mul``'s roundings).
        EARLY (the weight was written before the previous launch): the first EARLY (1 or 2) K
        tiles of the weight are loaded before the PDL wait, so a program placed while its
        predecessor drains already streams; the same sums in the same order as without.
        GATED weight tiles: STACKED (the tensor-core form) stacks the gate and up rows in one
        [ROWS = 2 BLOCK_N, BLOCK_K] tile and one dot (split in the epilogue), shaped like the
        plain tiles; TWO_TILES keeps them in two tiles and two accumulators. Without GATED,
        ROWS = BLOCK_N."""
        pid_n = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        m_ok = rm < M
        if STACKED:  # tile row r: gate row rn[r] for r < BLOCK_N, else up row N + rn[r - BLOCK_N]
            rr = tl.arange(0, ROWS)
            rn_w = pid_n * BLOCK_N + rr % BLOCK_N
            n_ok_w = rn_w < N
            w_rows = w_ptr + (rn_w * swn + (rr // BLOCK_N) * N * swn)[:, None]
        else:
            n_ok_w = n_ok
            w_rows = w_ptr + rn[:, None] * swn
        x_rows = x_ptr + rm[:, None] * sxm
        if EARLY >= 1:  # the weight's first tiles, before the wait (no other input is read before it)
            w0, wu0 = _gemv_weight_tile(w_rows, rk, n_ok_w, K, N * swn, TWO_TILES)
        if EARLY >= 2:
            w1, wu1 = _gemv_weight_tile(w_rows, BLOCK_K + rk, n_ok_w, K, N * swn, TWO_TILES)
        pdl_enter(PDL)
        if DOT:
            acc = tl.zeros((ROWS, BLOCK_M), dtype=tl.float32)
        elif BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # K reduced once, at the end
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = acc  # used with GATED only
        if HAS_NORM:
            ss = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        else:
            ss = tl.zeros((1, 1), dtype=tl.float32)  # unused
        if EARLY >= 1:
            acc, acc_u, ss = _gemv_accumulate(acc, acc_u, ss, w0, wu0, x_rows, nw_ptr, rk, rk < K, m_ok,
                                              DOT, BLOCK_M, DOT_F32, IEEE, HAS_NORM, TWO_TILES)
        if EARLY >= 2:
            acc, acc_u, ss = _gemv_accumulate(acc, acc_u, ss, w1, wu1, x_rows, nw_ptr, BLOCK_K + rk,
                                              BLOCK_K + rk < K, m_ok, DOT, BLOCK_M, DOT_F32, IEEE, HAS_NORM,
                                              TWO_TILES)
        for k0 in range(EARLY * BLOCK_K, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            w, wu = _gemv_weight_tile(w_rows, kk, n_ok_w, K, N * swn, TWO_TILES)
            acc, acc_u, ss = _gemv_accumulate(acc, acc_u, ss, w, wu, x_rows, nw_ptr, kk, k_ok, m_ok,
                                              DOT, BLOCK_M, DOT_F32, IEEE, HAS_NORM, TWO_TILES)
        if STACKED:  # [BLOCK_M, 2 BLOCK_N] -> gate and up halves [BLOCK_M, BLOCK_N]
            both = tl.permute(tl.reshape(tl.trans(acc), (BLOCK_M, 2, BLOCK_N)), (0, 2, 1))
            out, out_u = tl.split(both)
        elif DOT:
            out = tl.trans(acc)
            if GATED:
                out_u = tl.trans(acc_u)
        elif BLOCK_M == 1:
            out = tl.sum(acc, 1)[None, :]
            if GATED:
                out_u = tl.sum(acc_u, 1)[None, :]
        else:
            out = acc
            if GATED:
                out_u = acc_u
        if HAS_NORM:
            inv = tl.math.rsqrt(tl.sum(ss, 1) / K + eps)[:, None]
            out *= inv
            if GATED:
                out_u *= inv
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                out_u += tl.load(b_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        out = out.to(y_ptr.dtype.element_ty)
        if GATED:  # silu_mul of the two rounded halves, with its roundings
            g32 = out.to(tl.float32)
            a = (g32 / (1.0 + tl.exp(-g32))).to(y_ptr.dtype.element_ty)
            out = (a.to(tl.float32) * out_u.to(y_ptr.dtype.element_ty).to(tl.float32)).to(y_ptr.dtype.element_ty)
        if HAS_RES:
            r = tl.load(r_ptr + rm[:, None] * srm + rn[None, :], mask=ok, other=0.0)
            out = (out.to(tl.float32) + r.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], out, mask=ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, *, norm: tuple | None = None, gated: bool = False,
         early: bool = False, backend: str = "auto", config: dict | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] (module doc) -> [..., N] in x's dtype
    ([..., N / 2] with ``gated``: silu(gate) * up of the merged [gate; up] weight).

    ``early``: the caller promises that the weight was complete before the previous kernel in
    the stream was launched (a model's parameters in a decode step): with programmatic
    dependent launch the kernel then reads the weight's first tile before it waits for that
    kernel (``kvcomp.ops._pdl``), so its programs stream while the predecessor drains (inputs
    of up to ``EARLY_MAX_ROWS`` rows: measured faster there only). Never for a weight the
    previous kernel writes. Same result either way.
    ``config`` overrides ``GEMV_CONFIG`` keys (the sweep); x and weight must share a dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=x.device)
    if x.dim() < 1 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [N, K] for x {tuple(x.shape)} [..., K]")
    if weight.dtype != x.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must have one dtype")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias {tuple(bias.shape)} must be [N] for weight {tuple(weight.shape)}")
    N, K = weight.shape
    if gated:
        if N % 2:
            raise ValueError(f"gated gemv needs a [gate; up] weight of even rows, got {tuple(weight.shape)}")
        N //= 2
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), device=x.device)
        if residual.shape != (*x.shape[:-1], N):
            raise ValueError(f"residual {tuple(residual.shape)} must be [..., N] = "
                             f"{(*x.shape[:-1], N)} for x {tuple(x.shape)}, weight {tuple(weight.shape)}"
                             + (" (gated)" if gated else ""))
    rows = x.numel() // K if K else 0
    if norm is not None:
        if not (isinstance(norm, tuple) and len(norm) == 2):
            raise TypeError(f"norm must be (norm_weight [K], eps), got {type(norm).__name__}")
        check_tensor("norm weight", norm[0], ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        if norm[0].shape[0] != weight.shape[1]:
            raise ValueError(f"norm weight {tuple(norm[0].shape)} must be [K] = [{weight.shape[1]}]")
    cfg = dict(GEMV_CONFIG_ONE_ROW if rows == 1 else GEMV_CONFIG, **(config or {}))
    if cfg["form"] not in ("dot", "fma"):
        raise ValueError(f"config form must be 'dot' or 'fma', got {cfg['form']!r}")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if not use_triton(backend, x, weight) or triton is None or x.numel() == 0 or N == 0:
        return gemv_ref(x, weight, bias, residual, norm, gated)
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    dot = cfg["form"] == "dot"
    block_m = 16 if dot else max(1, triton.next_power_of_2(M))
    if not dot and block_m > 4:
        raise ValueError(f"config form 'fma' takes at most 4 rows, got {M}")
    r2 = None if residual is None else residual.reshape(M, N)
    if r2 is not None and r2.stride(1) != 1:
        r2 = r2.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    # gated: as many weight rows per program as the plain tiles (half gate, half up); the
    # tensor-core form stacks them in one tile (GATED_STACKED)
    block_n = max(16 if dot else 1, cfg["block_n"] // 2) if gated else cfg["block_n"]
    stacked = bool(gated) and dot and GATED_STACKED
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m))
    with device_guard(x):
        _gemv_kernel[grid](
            x2, weight, bias if bias is not None else weight, r2 if r2 is not None else y, y, M, N, K,
            x2.stride(0), weight.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0),
            HAS_BIAS=bias is not None, HAS_RES=r2 is not None, DOT=dot, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=cfg["block_k"], DOT_F32=dot and interpreting(), IEEE=x.dtype == torch.float32,
            nw_ptr=norm[0].contiguous() if norm is not None else None,
            eps=float(norm[1]) if norm is not None else 0.0, HAS_NORM=norm is not None,
            GATED=bool(gated), EARLY=EARLY_TILES if early and EARLY_WEIGHT and M <= EARLY_MAX_ROWS else 0,
            STACKED=stacked, TWO_TILES=bool(gated) and not stacked, ROWS=2 * block_n if stacked else block_n,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **pdl_args(x, "gemv_gated" if gated else "gemv"),
        )
    return y.view(*x.shape[:-1], N)
