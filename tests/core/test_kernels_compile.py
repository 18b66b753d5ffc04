"""The Triton kernels compile for an H100 / H200 (sm_90) on this CPU machine.

The interpreter (TRITON_INTERPRET=1, what the other CPU tests run) executes kernels as numpy
and skips the compiler's checks: a loop-carried name that changes type, a constexpr reused as
a tensor, a bad cast all pass there and fail only on a GPU. ``triton.compile`` for a CUDA
target runs the front end and the PTX / cubin back end without a GPU (ptxas ships with the
triton wheel). The checks run in a subprocess without TRITON_INTERPRET (under it, ``@triton.jit``
makes interpreter objects that the compiler cannot take)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def compile_sm90(fn, args: dict, aligned: tuple[str, ...] | None = None, **options):
    """args: a type string ("*i32", "i32", "fp32", "*bf16", ...) or a constexpr value per name;
    options: launch options (num_warps, enable_fp_fusion, ...). ``aligned``: as the JIT compiles
    for 16-byte aligned tensors, tt.divisibility 16 on every pointer and on these ints. Returns
    the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: (a if isinstance(a, str) else "constexpr") for n, a in args.items()}
    cx = {n: a for n, a in args.items() if not isinstance(a, str)}
    assert list(sig) == list(fn.arg_names), "give every argument, in order"
    attrs = None
    if aligned is not None:
        attrs = {(i,): [["tt.divisibility", 16]] for i, (n, a) in enumerate(args.items())
                 if isinstance(a, str) and (a.startswith("*") or n in aligned)}
    opts = {k: v for k, v in options.items() if k != "num_warps"}
    if "num_warps" in options:
        opts["num_warps"] = options["num_warps"]
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=opts)


def _select_args(hist: bool, compact: bool = True, single: bool = True, pdl: bool = False,
                 coarse: bool = False) -> dict:
    return dict(key_ptr="*i32", len_ptr="*i32", kb_ptr="*i32", must_ptr="*i32", out_ptr="*i32",
                Hkv="i32", NB_IN="i32", K="i32", KB_CONST="i32", sob="i32", soh="i32",
                CHUNK=128, M=3, BLOCK=1024, SINGLE=single, KB_TENSOR=False, ARITY=2,
                hist_ptr="*i32", HIST=hist, KMIN=-512, NBINS=1024 if compact else 2048, COMPACT=compact, PDL=pdl,
                KSTEP=(32 if coarse else 2) if compact else 1, COARSE=coarse)


def check_select_kernel():
    """The search, the histogram stage 2 by prefix sums (one row in registers, and tiled; bins of
    one value and coarse bins), and the previous histogram stage 2."""
    hk = importlib.import_module("kvcomp.ops.hamming_topk.kernels")
    for hist, compact, single, coarse in ((False, True, True, False), (True, True, True, False),
                                          (True, True, False, False), (True, False, True, False),
                                          (True, True, True, True), (True, True, False, True)):
        compile_sm90(hk._select_kernel, _select_args(hist, compact, single, coarse=coarse), num_warps=4)


def _block_keys_args(hist: bool, lse: bool, n_sub: int = 1, pdl: bool = False, form: int = 0,
                     qs_from_q: bool = False, sliced: bool = True) -> dict:
    """form 0: the direct sum over G = 4 query codes; 2: the signed planes derived in the scan
    (sliced: by bit-sliced adders, else cross-thread reductions); qs_from_q ("lse"): the query
    scale from the bf16 queries (decode_step)."""
    i32 = "i32"
    return dict(
        rows_ptr="*i32", base_ptr="*i32", k_ptr="*i32", len_ptr="*i32", key_ptr="*i32",
        scale_ptr="*fp16" if lse else "*i32", qs_ptr="*fp32", lse_c="fp32",
        Hkv=i32, NB_OUT=i32, BLOCKS_PER_PROG=i32, srb=i32, srh=i32, srr=i32, srw=i32,
        skb=i32, skh=i32, skt=i32, skw=i32, ssb=i32, ssh=i32, sst=i32,
        G=4, W=4, BLOCK_W=4, FORM=form, R=3 if form else 4, HAS_BASE=False, CHUNK=128, CP=128 // n_sub,
        N_SUB=n_sub, NBT=4,
        MEAN=False, K_CONTIG=True, USE_ASM=True, HAS_SCALE=lse, cnt_ptr="*i32", kb_ptr="*i32",
        must_ptr="*i32", out_ptr="*i32", K=i32, KB_CONST=i32, sob=i32, soh=i32, FUSED=False, M=3,
        SEL_BLOCK=16, SINGLE=True, KB_TENSOR=False, ARITY=2, hist_ptr="*i32", HIST=hist, KMIN=-512,
        NBINS=1024, LSE=lse, PDL=pdl, ROWS_IN=form != 0, MAJORITY=False, R_PAD=4, EARLY=False, KSTEP=2,
        SLICED=sliced, q_ptr="*bf16", sqb=i32, sqr=i32, sqd=i32, q_inv_sqrt_d="fp32", QS_FROM_Q=qs_from_q, QG=4, QG_P=4,
        QD=128, QD_P=128,
    )


def check_block_keys_kernel_with_histogram():
    """The scan with the histogram, and the "lse" block scores with key norms (one and two
    sub-blocks per block: the online log-sum-exp)."""
    hk = importlib.import_module("kvcomp.ops.hamming_topk.kernels")
    compile_sm90(hk._block_keys_kernel, _block_keys_args(hist=True, lse=False))
    compile_sm90(hk._block_keys_kernel, _block_keys_args(hist=True, lse=False, form=2))
    compile_sm90(hk._block_keys_kernel, _block_keys_args(hist=True, lse=False, form=2, sliced=False))
    compile_sm90(hk._block_keys_kernel, dict(_block_keys_args(hist=True, lse=False, form=0), MAJORITY=True,
                                             ROWS_IN=True, R=1))
    # the histogram stage 2 in the scan's launch (FUSED_HIST_SELECT): ticket, then the selection
    ptx = compile_sm90(hk._block_keys_kernel, dict(_block_keys_args(hist=True, lse=False, form=2),
                                                   FUSED=True, SEL_BLOCK=1024)).asm["ptx"]
    assert "ld.global.cg" in ptx and "bar.sync" in ptx
    compile_sm90(hk._query_rows_kernel, _query_rows_args(False))
    for n_sub in (1, 2):
        compile_sm90(hk._block_keys_kernel, _block_keys_args(hist=False, lse=True, n_sub=n_sub))
    compile_sm90(hk._block_keys_kernel, _block_keys_args(hist=False, lse=True, form=2, qs_from_q=True))


def _split_args(fused: bool, t_q: int, pdl: bool = False, sel: bool = False, single: bool = False) -> dict:
    """sel: the histogram selection in the prologue (``DeferredSelect``), the row's keys in
    one tile (single) or in tiles of 1024."""
    i32 = "i32"
    args = dict(
        q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", idx_ptr="*i32", len_ptr="*i32",
        m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", Hkv=i32, K_ENT=i32, TOK_PER_SPLIT=i32,
        SPLITS=i32, scale_log2="fp32", sqb=i32, sqh=i32, sqd=i32, skb=i32, skh=i32, skt=i32,
        skd=i32, svb=i32, svh=i32, svt=i32, svd=i32, sib=i32, sih=i32, sik=i32,
        G=4, D=128, G_PAD=16, BLOCK_D=128, BLOCK_N=64, CHUNK=128, IEEE=False, DOT_F32=False,
        tbl_ptr="*i32", stb=i32, stp=i32, PAGED=False, PAGE=1,
        out_ptr="*bf16", sob=i32, soh=i32, sod=i32, ticket_ptr="*i32", FUSED=fused,
        G_R=4 * t_q, S_PAD=32, S_TILE=8, m1_ptr="*fp32", l1_ptr="*fp32", acc1_ptr="*fp32",
        gticket_ptr="*i32", GROUP=i32, NG=i32, TWO_LEVEL=False, L1_PAD=8, L1_TILE=8, T_Q=t_q, PDL=pdl, EARLY=False,
        sel_key_ptr="*i32", sel_hist_ptr="*i32", sel_must_ptr="*i32", sel_kb_ptr="*i32", SEL_NB=i32,
        SEL_KB=i32, SEL=sel, SEL_M=3, SEL_BLOCK=1024, SEL_SINGLE=single, SEL_KB_TENSOR=False,
        SEL_KMIN=-512, SEL_NBINS=256, SEL_KSTEP=2, SEL_PAD=4, BLK_SCALAR=False,
        tline_ptr="*i64", TLINE=False, TLINE_COLS=16,
    )
    if t_q > 1:
        args.update(G=4 * t_q, G_PAD=max(16, 4 * t_q))
    return args


def _merge_args(pdl: bool = False, hist: bool = False) -> dict:
    i32 = "i32"
    return dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr="*bf16", Hq=i32, SPLITS=i32,
                sob=i32, soh=i32, sod=i32, D=128, S_PAD=32, BLOCK_D=128, PDL=pdl,
                hist_ptr="*i32", G_H=i32, NBINS=1024, HIST=hist)


def check_sparse_decode_attention_kernels():
    """The split kernel with the fused merge (ticket atomics, per-row merge loop) and without,
    with several queries per sequence (causal rows), the separate merge kernel."""
    ak = importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels")
    for fused, t_q in ((True, 1), (False, 1), (True, 4)):  # t_q: queries per sequence
        ptx = compile_sm90(ak._sparse_decode_split_kernel, _split_args(fused, t_q), num_warps=4,
                           num_stages=2).asm["ptx"]
        if fused:  # the ticket: a gpu-scope acq_rel atomic add after a CTA barrier
            assert "atom.global.gpu.acq_rel.add" in ptx or "atom.acq_rel.gpu.global.add" in ptx, \
                [ln for ln in ptx.splitlines() if "atom" in ln]
            assert "bar.sync" in ptx
    compile_sm90(ak._merge_kernel, _merge_args(), num_warps=4)
    # a tile's block entry as one scalar loaded a step ahead (BLK_SCALAR, chunk 128, 64-token
    # tiles): no per-token [64] vector of entry pointers is left, and no K / V load waits on one
    for scalar in (False, True):
        args = dict(_split_args(True, 1), CHUNK=128, BLK_SCALAR=scalar)
        ir = compile_sm90(ak._sparse_decode_split_kernel, args, num_warps=4, num_stages=2).asm["ttgir"]
        assert ("tensor<64x!tt.ptr<i32>" in ir) != scalar, scalar
    compile_sm90(ak._sparse_decode_split_kernel, dict(_split_args(True, 1, pdl=True, sel=True), CHUNK=128,
                                                       BLK_SCALAR=True, EARLY=True), num_warps=4, num_stages=2)
    # ... on a paged pool, and on one-tile splits (one stage)
    compile_sm90(ak._sparse_decode_split_kernel, dict(_split_args(True, 1), PAGED=True, PAGE=64, CHUNK=128,
                                                       BLK_SCALAR=True), num_warps=4, num_stages=1)
    # the two-level fused merge (MERGE_GROUP_SPLITS): a group ticket, then the row ticket
    ptx = compile_sm90(ak._sparse_decode_split_kernel, dict(_split_args(True, 1, pdl=True, sel=True), TWO_LEVEL=True),
                       num_warps=4, num_stages=2).asm["ptx"]
    atoms = [ln for ln in ptx.splitlines() if "atom." in ln and "acq_rel" in ln]
    assert len(atoms) >= 2, atoms
    # the timeline hook (TIMELINE): six %globaltimer reads (the PDL wait's included) and the %smid,
    # fused (one and two levels) and unfused (five: no ticket); without it none is compiled in
    for base in (_split_args(True, 1), _split_args(False, 1), dict(_split_args(True, 1), TWO_LEVEL=True),
                 dict(_split_args(True, 1, pdl=True, sel=True), CHUNK=128, BLK_SCALAR=True, EARLY=True)):
        ptx = compile_sm90(ak._sparse_decode_split_kernel, dict(base, TLINE=True), num_warps=4,
                           num_stages=2).asm["ptx"]
        assert ptx.count("%globaltimer") == 6 - (not base["FUSED"]) and "%smid" in ptx, ptx.count("%globaltimer")
    assert "%globaltimer" not in compile_sm90(ak._sparse_decode_split_kernel, _split_args(True, 1), num_warps=4,
                                              num_stages=2).asm["ptx"]
    # the selection in the prologue of split programs whose merge is its own launch
    # (SELECT_IN_PROLOGUE_UNFUSED): the merge kernel zeroes the histogram, after its PDL wait
    compile_sm90(ak._sparse_decode_split_kernel, _split_args(False, 1, pdl=True, sel=True),
                 num_warps=4, num_stages=2)
    ptx = compile_sm90(ak._merge_kernel, _merge_args(pdl=True, hist=True), num_warps=4).asm["ptx"]
    body = ptx[ptx.index(".entry"):]
    assert 0 < body.find("griddepcontrol.wait") < body.find("st.global")
    # the selection in the prologue (decode_step at few rows): with PDL and the early loads, the
    # block keys and the histogram are read after the wait (they are the scan's output)
    for single in (True, False):
        k = compile_sm90(ak._sparse_decode_split_kernel,
                         dict(_split_args(True, 1, pdl=True, sel=True, single=single), EARLY=True),
                         num_warps=4, num_stages=2)
        body = k.asm["ptx"][k.asm["ptx"].index(".entry"):]
        wait = body.find("griddepcontrol.wait")
        assert 0 < wait < body.find("st.global") and wait < body.find("atom."), single


def _norm_act_cases(pdl: bool = False) -> list:
    """(kernel, args, options) of every norm_act kernel (rope in bf16)."""
    na = importlib.import_module("kvcomp.ops.norm_act")
    i32 = "i32"
    return [
        (na._rms_norm_kernel, dict(x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", N=i32, sx=i32, sy=i32,
                                   eps="fp32", BLOCK=4096, PDL=pdl), {}),
        (na._silu_mul_kernel, dict(g_ptr="*bf16", u_ptr="*bf16", y_ptr="*bf16", n=i32, width=i32, sg=i32,
                                   su=i32, BLOCK=1024, PDL=pdl), {}),
        (na._rope_kernel, _rope_args("bf16", pdl), na.ROPE_LAUNCH),
        (na._add_rms_norm_kernel, dict(x_ptr="*bf16", r_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16",
                                       s_ptr="*bf16", N=i32, sx=i32, sr=i32, sy=i32, ss=i32, eps="fp32",
                                       BLOCK=4096, PDL=pdl), dict(num_warps=8)),
        (na._head_rms_norm_kernel, dict(y_ptr="*bf16", wq_ptr="*bf16", wk_ptr="*bf16", HQ=i32, HK=i32,
                                        D=i32, sy=i32, eps="fp32", BLOCK=128, PDL=pdl), {}),
    ]


def _rope_args(dt: str, pdl: bool = False) -> dict:
    i32 = "i32"
    return dict(
        q_ptr=f"*{dt}", k_ptr=f"*{dt}", c_ptr=f"*{dt}", s_ptr=f"*{dt}", qo_ptr=f"*{dt}", ko_ptr=f"*{dt}",
        NQ=i32, Hq=i32, Hkv=i32, T=i32, sqb=i32, sqh=i32, sqt=i32, skb=i32, skh=i32, skt=i32,
        scb=i32, sct=i32, ssb=i32, sst=i32, HALF=64, BLOCK=64, PDL=pdl,
    )


def check_norm_act_kernels():
    na = importlib.import_module("kvcomp.ops.norm_act")
    for fn, args, opts in _norm_act_cases():
        compile_sm90(fn, args, **opts)
    for dt in ("bf16", "fp16", "fp32"):
        args = _rope_args(dt)
        # with the launch options rope uses: every product and sum rounded on its own, as in torch
        ptx = compile_sm90(na._rope_kernel, args, **na.ROPE_LAUNCH).asm["ptx"]
        assert "fma." not in ptx, f"{dt}: the rope kernel contracts a product into an fma"
        if dt == "bf16":  # what the default options do (the cause of the H200 mismatch)
            assert "fma.rn.bf16" in compile_sm90(na._rope_kernel, args).asm["ptx"]


def _gemv_args(dot: bool, block_m: int, block_n: int, block_k: int, extras: bool, pdl: bool = False) -> dict:
    i32 = "i32"
    return dict(
        x_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", r_ptr="*bf16", y_ptr="*bf16", M=i32, N=i32,
        K=i32, sxm=i32, swn=i32, srm=i32, sym=i32, HAS_BIAS=extras, HAS_RES=extras, DOT=dot,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_F32=False, IEEE=False,
        nw_ptr="*bf16" if extras else None, eps="fp32", HAS_NORM=extras, PDL=pdl, GATED=False, EARLY=0,
        STACKED=False, TWO_TILES=False, ROWS=block_n,
    )


def _gated_args(dot: bool, block_m: int, block_n: int, block_k: int, stacked: bool) -> dict:
    """The gated epilogue with as many weight rows a program as the plain tile of block_n rows:
    stacked (one tile of gate and up rows) or in two tiles."""
    half = max(16 if dot else 1, block_n // 2)
    return dict(_gemv_args(dot, block_m, half, block_k, True), GATED=True, STACKED=stacked,
                TWO_TILES=not stacked, ROWS=2 * half if stacked else half)


def check_gemv_kernel():
    """Both tile forms, with the bias, the residual epilogue and the RMSNorm prologue, and the
    gated (silu(gate) * up) epilogue."""
    gv = importlib.import_module("kvcomp.ops.gemv")
    for dot, block_m, block_n, block_k in ((True, 16, 32, 256), (False, 1, 4, 1024), (False, 4, 8, 512)):
        for extras in (False, True):
            compile_sm90(gv._gemv_kernel, _gemv_args(dot, block_m, block_n, block_k, extras),
                         num_warps=4, num_stages=3)
        gated = _gated_args(dot, block_m, block_n, block_k, stacked=dot)
        ptx = compile_sm90(gv._gemv_kernel, gated, num_warps=4, num_stages=3).asm["ptx"]
        assert "ex2.approx" in ptx  # the silu's exp
        if dot:  # stacked: the plain tile's tensor-core work (two 16-row tiles: every warp ran all)
            plain = compile_sm90(gv._gemv_kernel, _gemv_args(dot, block_m, block_n, block_k, True),
                                 num_warps=4, num_stages=3).asm["ptx"]
            two = compile_sm90(gv._gemv_kernel, _gated_args(dot, block_m, block_n, block_k, stacked=False),
                               num_warps=4, num_stages=3).asm["ptx"]
            assert ptx.count("mma.sync") == plain.count("mma.sync") < two.count("mma.sync"), (
                ptx.count("mma.sync"), plain.count("mma.sync"), two.count("mma.sync"))
        # EARLY: the weight's first tile (both halves when gated) loaded before the PDL wait,
        # x (the previous launch's output) only after it; nothing stored before it
        for args in (_gemv_args(dot, block_m, block_n, block_k, True, pdl=True), dict(gated, PDL=True)):
            for tiles in (1, 2):
                body = straight_path(compile_sm90(gv._gemv_kernel, dict(args, EARLY=tiles), num_warps=4,
                                                  num_stages=3).asm["ptx"])
                before, after = body.split("griddepcontrol.wait")
                assert before.count("ld.global") >= tiles * (2 if args["GATED"] else 1)
                assert "st.global" not in before and after.count("ld.global") >= 1


def _part2_args(split: bool) -> dict:
    """The second part's arguments of the encode kernels (``hash_encode_split``)."""
    i32 = "i32"
    return dict(x2_ptr="*bf16", w2_ptr="*fp32", D2=i32, W1=i32, sx2b=i32, sx2h=i32, sx2n=i32, sx2d=i32,
                sw2h=i32, sw2d=i32, sw2k=i32, SPLIT=split)


def _row_encode_args(codes: bool, pdl: bool = False, split: bool = False) -> dict:
    i32 = "i32"
    return dict(
        x_ptr="*bf16", w_ptr="*fp32", out_ptr="*i32", pos_ptr="*i32", bias_ptr="*fp32",
        D=i32, H=i32, L_out=i32, HG=i32, sxb=i32, sxh=i32, sxn=i32, sxd=i32, swh=i32, swd=i32, swk=i32,
        sob=i32, soh=i32, son=i32, sow=i32, sbb=i32, sbh=i32, sbk=i32,
        HAS_POS=True, HAS_BIAS=codes and not split, BLOCK_D=128 if not split else 512, kc_ptr="*bf16",
        v_ptr="*bf16", vc_ptr="*bf16",
        skb=i32, skh=i32, skn=i32, svb=i32, svh=i32, svn=i32, svd=i32, svcb=i32, svch=i32, svcn=i32,
        COPY=not split, CODES=codes, V_PROG=1 if codes else 0, DV=i32, BLOCK_DV=128, PDL=pdl,
        **_part2_args(split), BLOCK_D2=64,
    )


def _encode_args(split: bool, wpp: int = 1) -> dict:
    i32 = "i32"
    return dict(
        x_ptr="*bf16", w_ptr="*fp32", out_ptr="*i32", pos_ptr="*i32", bias_ptr="*fp32",
        N=i32, D=i32, H=i32, L_out=i32, HG=i32, sxb=i32, sxh=i32, sxn=i32, sxd=i32, swh=i32, swd=i32, swk=i32,
        sob=i32, soh=i32, son=i32, sow=i32, sbb=i32, sbh=i32, sbk=i32,
        HAS_POS=False, HAS_BIAS=False, BLOCK_N=16, BLOCK_K=128, TF32=True, W1=i32, WPP=wpp,
        x2_ptr="*bf16", w2_ptr="*fp32", D2=i32, W2=i32, sx2b=i32, sx2h=i32, sx2n=i32, sx2d=i32,
        sw2h=i32, sw2d=i32, sw2k=i32, SPLIT=split,
    )


def check_append_kv_kernel():
    """The one-row encode kernel with the cache's key / value copies, with and without codes."""
    he = importlib.import_module("kvcomp.ops.hash_encode.kernels")
    for codes in (True, False):
        compile_sm90(he._hash_encode_row_kernel, _row_encode_args(codes), num_warps=4)


def check_hash_encode_split_kernels():
    """Both encode kernels with a second part (MLA's 512 + 64 split), the tile kernel at 1, 2 and 4
    code words a program (tf32 MMAs: WPP x those of one word, one loop for both parts); the row
    kernel's split stores only the code word."""
    he = importlib.import_module("kvcomp.ops.hash_encode.kernels")
    for wpp in (1, 2, 4):
        plain = compile_sm90(he._hash_encode_kernel, _encode_args(False, wpp), num_warps=4).asm["ptx"]
        split = compile_sm90(he._hash_encode_kernel, _encode_args(True, wpp), num_warps=4).asm["ptx"]
        # one product loop for both inputs (pointers picked per program), WPP x the MMAs of one word
        assert split.count("mma.sync") == plain.count("mma.sync") > 0
        if wpp == 1:
            mma1 = plain.count("mma.sync")
        assert plain.count("mma.sync") == wpp * mma1
    row = compile_sm90(he._hash_encode_row_kernel, _row_encode_args(True, split=True), num_warps=4).asm["ptx"]
    assert row.count("st.global") == 1  # only the code word (no key / value copies)


def _query_rows_args(pdl: bool) -> dict:
    i32 = "i32"
    return dict(q_ptr="*i32", rows_ptr="*i32", base_ptr="*i32", Hkv=i32, sqb=i32, sqh=i32, sqw=i32,
                G=8, W=4, BLOCK_W=4, R=4, MAJORITY=False, PDL=pdl, FORM=2, R_PAD=4)


def _mla_split_args(sparse: bool, pdl: bool = False) -> dict:
    args = dict(Q_LAT="*bf16", Q_PE="*bf16", CKV="*bf16", KPE="*bf16", BLOCK_IDX="*i32", SEQ_LENS="*i32",
                O_PART="*fp32", LSE_PART="*fp32", scale_log2="fp32", H="i32", n_virtual="i32", per_split="i32",
                chunk_size="i32")
    args.update({n: "i32" for n in ("s_qlb s_qlh s_qlr s_qpb s_qph s_qpp s_cb s_cl s_cr s_kb s_kl s_kp s_bib "
                                    "s_bik s_ob s_oh s_os s_lb s_lh").split()})
    args.update(s_qlr=1, s_qpp=1, s_cr=1, s_kp=1, R=512, P=64, BLOCK_R=512, BLOCK_P=64,
                BLOCK_H=32 if sparse else 64, BLOCK_T=32 if sparse else 64, SPARSE=sparse, IEEE=False, PDL=pdl)
    return args


def _mla_merge_args(pdl: bool = False) -> dict:
    return dict(O_PART="*fp32", LSE_PART="*fp32", OUT="*bf16", H="i32", n_splits="i32", s_ob="i32", s_oh="i32",
                s_os="i32", s_lb="i32", s_lh="i32", s_outb="i32", s_outh="i32", s_outr="i32", R=512, BLOCK_R=128,
                BLOCK_S=64, PDL=pdl)


def _planes_args(pdl: bool = False) -> dict:
    return dict(q_ptr="*i32", planes_ptr="*i32", Hkv="i32", sqb="i32", sqh="i32", sqw="i32", G=128, G_PAD=128,
                W=18, R=8, R_PAD=8, PDL=pdl)


def _wide_args(pdl: bool = False) -> dict:
    return dict(planes_ptr="*i32", k_ptr="*i32", len_ptr="*i32", key_ptr="*i32", Hkv="i32", NB_OUT="i32",
                BLOCKS_PER_PROG="i32", skb="i32", skh="i32", W=18, R=8, CHUNK=128, NWARPS=4, must_ptr="*i32",
                hist_ptr="*i32", HIST=False, M=3, KMIN=-512, NBINS=1024, KSTEP=4, PDL=pdl)


def check_pdl_kernels():
    """Every decode-step and fused-decoder kernel with programmatic dependent launch (``kvcomp.ops._pdl``): the
    grid-dependency wait, then the launch of dependents, both before the kernel's first global
    load or store (``pdl_enter`` comes first); without PDL neither instruction is there."""
    he = importlib.import_module("kvcomp.ops.hash_encode.kernels")
    hk = importlib.import_module("kvcomp.ops.hamming_topk.kernels")
    ak = importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels")
    gv = importlib.import_module("kvcomp.ops.gemv")
    mk = importlib.import_module("kvcomp.ops.sparse_mla_decode.kernels")
    mw = importlib.import_module("kvcomp.ops.hamming_topk.mma_wide")
    cases = [
        (he._hash_encode_row_kernel, _row_encode_args, dict(codes=True), {}),
        (gv._gemv_kernel, _gemv_args, dict(dot=False, block_m=1, block_n=4, block_k=1024, extras=True),
         dict(num_warps=4, num_stages=3)),
        (gv._gemv_kernel, _gemv_args, dict(dot=True, block_m=16, block_n=32, block_k=256, extras=False),
         dict(num_warps=4, num_stages=3)),
        (hk._query_rows_kernel, _query_rows_args, {}, dict(num_warps=1)),
        (hk._block_keys_kernel, _block_keys_args, dict(hist=True, lse=False, form=2), {}),
        (hk._block_keys_kernel, _block_keys_args, dict(hist=False, lse=True, n_sub=2), {}),
        (hk._select_kernel, _select_args, dict(hist=True), dict(num_warps=4)),
        (hk._select_kernel, _select_args, dict(hist=False), dict(num_warps=4)),
        (ak._sparse_decode_split_kernel, _split_args, dict(fused=True, t_q=1), dict(num_stages=2)),
        (ak._merge_kernel, _merge_args, {}, {}),
        (mk._mla_decode_split_kernel, _mla_split_args, dict(sparse=True), dict(num_warps=4, num_stages=2)),
        (mk._mla_decode_split_kernel, _mla_split_args, dict(sparse=False), dict(num_warps=8, num_stages=2)),
        (mk._mla_merge_kernel, _mla_merge_args, {}, dict(num_warps=4)),
        (mw._signed_planes_kernel, _planes_args, {}, dict(num_warps=4)),
        (mw._block_keys_wide_kernel, _wide_args, {}, dict(num_warps=4)),
    ]
    for fn, args, opts in _norm_act_cases(pdl=True):
        cases.append((fn, lambda pdl, a=args: dict(a, PDL=pdl), {}, opts))
    for fn, make, kw, opts in cases:
        ptx = compile_sm90(fn, make(**kw, pdl=True), **opts).asm["ptx"]
        body = ptx[ptx.index(".entry"):]
        wait, launch = body.find("griddepcontrol.wait"), body.find("griddepcontrol.launch_dependents")
        first_mem = min((i for i in (body.find("ld.global"), body.find("st.global"), body.find("atom."))
                         if i >= 0), default=len(body))
        assert 0 <= wait < launch < first_mem, (fn.__name__, kw, wait, launch, first_mem)
        plain = compile_sm90(fn, make(**kw, pdl=False), **opts).asm["ptx"]
        assert "griddepcontrol" not in plain, (fn.__name__, kw)
    # PDL 2 (a role in kvcomp.ops._pdl.NO_TRIGGER): the wait, no early signal to the successor
    ptx = compile_sm90(hk._select_kernel, _select_args(True, pdl=2), num_warps=4).asm["ptx"]
    assert "griddepcontrol.wait" in ptx and "launch_dependents" not in ptx
    # EARLY (decode_step): loads of older inputs may come before the wait, no store or atomic
    early = [(hk._block_keys_kernel, dict(_block_keys_args(hist=True, lse=False, form=f, pdl=True), EARLY=True), {})
             for f in (0, 2)]
    # "lse" with the query scale computed from q in the scan (decode_step): EARLY applies too
    early.append((hk._block_keys_kernel, dict(_block_keys_args(hist=False, lse=True, form=2, pdl=True,
                                                               qs_from_q=True), EARLY=True), {}))
    early.append((ak._sparse_decode_split_kernel, dict(_split_args(True, 1, pdl=True), EARLY=True),
                  dict(num_stages=2)))
    for fn, args, opts in early:
        body = straight_path(compile_sm90(fn, args, **opts).asm["ptx"])
        wait, launch = body.find("griddepcontrol.wait"), body.find("griddepcontrol.launch_dependents")
        first_write = min(i for i in (body.find("st.global"), body.find("atom."), len(body)) if i >= 0)
        assert 0 < body.find("ld.global") < wait < launch < first_write, (fn.__name__, args.get("FORM"))


def straight_path(ptx: str) -> str:
    """The kernel's PTX from its entry in execution order along unconditional jumps (a loop's
    latch may be laid out before its header): lines in the order the first pass runs them."""
    import re

    lines = ptx[ptx.index(".entry"):].splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"\s*(\$L\w+):", ln))}
    out, seen, i = [], set(), 0
    while i < len(lines):
        m = re.match(r"bra(?:\.uni)?\s+(\$L\w+);", lines[i].strip())
        if m:  # unconditional (a predicated jump starts with @)
            if m.group(1) in seen:
                break
            seen.add(m.group(1))
            i = labels[m.group(1)] + 1
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


def check_mma_scan_kernel():
    """The tensor-core scan (``mma_scan``) for sm_90 through ptxas: 1-bit AND-POPC MMAs, one per
    16 tokens, and no barrier (a block's reduction stays in its warp), for the chunk sizes and
    options it takes; with EARLY and FIRST_EARLY, the first warp tile's 16 key-code loads a
    lane (and the length) are issued before the PDL wait. G up to ``MMA_MAX_G`` (64)."""
    ms = importlib.import_module("kvcomp.ops.hamming_topk.mma_scan")
    i32 = "i32"
    for chunk, hist, early, G, R, first in ((128, False, False, 4, 3, True), (128, True, True, 8, 4, True),
                                            (16, True, True, 4, 3, True), (64, True, True, 4, 3, False),
                                            (256, False, False, 16, 5, True), (512, True, True, 4, 3, True),
                                            (32, True, False, 8, 4, True),
                                            # a verify step's G x T rows: 6 / 7 planes of counts
                                            (128, True, True, 32, 6, True), (16, False, False, 64, 7, True)):
        args = dict(q_ptr="*i32", k_ptr="*i32", len_ptr="*i32", key_ptr="*i32", Hkv=i32, NB_OUT=i32,
                    BLOCKS_PER_PROG=i32, sqb=i32, sqh=i32, sqw=1, skb=i32, skh=i32, G=G, R=R, CHUNK=chunk,
                    NWARPS=4, must_ptr="*i32", hist_ptr="*i32", HIST=hist, M=2, KMIN=-512, NBINS=1024, KSTEP=2,
                    PDL=1, EARLY=early, FIRST_EARLY=first)
        ptx = compile_sm90(ms._block_keys_mma_kernel, args, aligned=("skb", "skh"), num_warps=4).asm["ptx"]
        n_mma = ptx.count("mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc")
        assert n_mma == max(128, chunk) // 16, (chunk, n_mma)
        assert "bar.sync" not in ptx, chunk
        before_wait = ptx.split("griddepcontrol.wait")[0].count("ld.global")
        want = 1 + (16 if early and first and chunk <= 128 else 0)
        assert before_wait == (want if early else 0), (chunk, early, first, before_wait)


def check_mma_wide_kernel():
    """The wide tensor-core scan (``mma_wide``) for sm_90 through ptxas: 2 ceil(W / 8) 1-bit MMAs
    and as many 8-byte key-code loads a lane per 16 tokens, no barrier; its planes kernel."""
    mw = importlib.import_module("kvcomp.ops.hamming_topk.mma_wide")
    i32 = "i32"
    for W, R, chunk, hist in ((18, 8, 128, False), (8, 3, 64, True), (2, 3, 256, False), (32, 8, 16, True)):
        args = dict(planes_ptr="*i32", k_ptr="*i32", len_ptr="*i32", key_ptr="*i32", Hkv=i32, NB_OUT=i32,
                    BLOCKS_PER_PROG=i32, skb=i32, skh=i32, W=W, R=R, CHUNK=chunk, NWARPS=4, must_ptr="*i32",
                    hist_ptr="*i32", HIST=hist, M=2, KMIN=-512, NBINS=1024, KSTEP=4, PDL=1)
        ptx = compile_sm90(mw._block_keys_wide_kernel, args, aligned=("skb", "skh"), num_warps=4).asm["ptx"]
        groups = max(128, chunk) // 16
        n_mma = ptx.count("mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc")
        assert n_mma == groups * 2 * -(-W // 8), (W, chunk, n_mma)
        assert ptx.count("ld.global.b64") == groups * 2 * -(-W // 8), (W, chunk)
        assert "bar.sync" not in ptx, chunk
    compile_sm90(mw._signed_planes_kernel, _planes_args(pdl=True), num_warps=4)


def check_rope_append_kernel():
    """Every variant compiles; no fp contraction (RoPE rounds as torch: the rope kernel's rule);
    with EARLY only the q / k / v rows are loaded after the PDL wait, without it nothing before."""
    ra = importlib.import_module("kvcomp.ops.rope_append")
    i32 = "i32"
    for norm, codes, qcodes, bias, early in ((True, True, True, False, True), (False, False, False, False, True),
                                             (True, True, False, True, False), (False, False, True, False, False)):
        args = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", c_ptr="*bf16", s_ptr="*bf16", pos_ptr="*i32",
                    kb_ptr="*bf16", vb_ptr="*bf16", qo_ptr="*bf16", qn_ptr="*bf16", kn_ptr="*bf16",
                    kw_ptr="*fp32", code_ptr="*i32", bias_ptr="*fp32", qw_ptr="*fp32", qc_ptr="*i32",
                    Hq=i32, Hkv=i32, G=i32, L_out=i32, DV=i32, eps="fp32",
                    **{n: i32 for n in ("sqb", "sqh", "skb", "skh", "svb", "svh", "scb", "ssb", "skbb", "skbh",
                                        "skbn", "svbb", "svbh", "svbn", "swh", "swd", "swk", "sqwh", "sqwd",
                                        "sqwk", "scdb", "scdh", "scdn", "sbb", "sbh", "sbk")},
                    HALF=64, BLOCK=64, BLOCK_DV=128, W=4 if codes or qcodes else 1, NORM=norm, CODES=codes,
                    QCODES=qcodes, HAS_BIAS=bias, EARLY=early, PDL=1)
        ptx = compile_sm90(ra._rope_append_kernel, args, **ra._launch_options(128)).asm["ptx"]
        assert "fma." not in ptx, (norm, codes, qcodes)
        body = ptx[ptx.index(".entry"):]
        before, after = body.split("griddepcontrol.wait")
        if early:  # position, cos / sin halves (+ norm weights, + projection columns) before it
            assert before.count("ld.global") >= 5 and after.count("ld.global") >= 2, (before.count("ld.global"),)
            assert "st.global" not in before
        else:
            assert "ld.global" not in before


CHECKS = [check_select_kernel, check_block_keys_kernel_with_histogram, check_norm_act_kernels,
          check_sparse_decode_attention_kernels, check_gemv_kernel, check_append_kv_kernel,
          check_pdl_kernels, check_mma_scan_kernel, check_mma_wide_kernel, check_rope_append_kernel,
          check_hash_encode_split_kernels]


@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
def test_compiles_for_sm90(check):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, __file__, check], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


if __name__ == "__main__":
    {c.__name__: c for c in CHECKS}[sys.argv[1]]()
