"""Triton ``hamming_topk`` against its reference, compared with torch.equal (indices are exact).

CPU cases run under TRITON_INTERPRET=1 at small shapes; ``-m gpu`` cases at real shapes. Codes are
drawn either uniformly (distinct scores) or from 3 low bits (many tied scores: the tie rule and
the must-select handling are what those exercise)."""

import importlib

import pytest
import torch
from kvcomp.ops import hamming_topk
from kvcomp.ops.hamming_topk import majority_codes

kernels = importlib.import_module("kvcomp.ops.hamming_topk.kernels")


def codes(*shape, low_entropy=False, gen=None, device="cpu"):
    c = torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=gen)
    if low_entropy:
        c = c & 0x7
    return c.to(device)


def both(q, k, lens, **kw):
    got = hamming_topk(q, k, lens, backend="triton", **kw)
    want = hamming_topk(q, k, lens, backend="reference", **kw)
    return got, want


@pytest.mark.parametrize("G", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("low_entropy", [False, True])
def test_gqa_ratios_ragged(G, low_entropy):
    gen = torch.Generator().manual_seed(10 * G + low_entropy)
    B, Hkv, W, L = 3, 2, 2, 300
    q = codes(B, Hkv * G, W, low_entropy=low_entropy, gen=gen)
    k = codes(B, Hkv, L, W, low_entropy=low_entropy, gen=gen)
    lens = torch.tensor([L, 129, 1])
    got, want = both(q, k, lens, k_blocks=5, chunk_size=16)
    assert torch.equal(got, want)
    assert (got[2] == torch.tensor([0, -1, -1, -1, -1], dtype=torch.int32)).all()


@pytest.mark.parametrize("mode", ["exact", "exact_direct", "exact_planes", "exact_signed", "majority"])
@pytest.mark.parametrize("repre", ["max", "mean"])
def test_modes_and_block_repr(mode, repre):
    gen = torch.Generator().manual_seed(len(mode) + len(repre))
    B, Hkv, G, W, L = 2, 3, 8, 4, 127
    q = codes(B, Hkv * G, W, gen=gen)
    k = codes(B, Hkv, L, W, low_entropy=repre == "max", gen=gen)
    lens = torch.tensor([127, 63])
    got, want = both(q, k, lens, k_blocks=4, chunk_size=8, chunk_repre=repre, mode=mode)
    assert torch.equal(got, want)
    # three kv-heads with different keys must not all pick the same blocks
    assert not (torch.equal(got[:, 0], got[:, 1]) and torch.equal(got[:, 1], got[:, 2]))


@pytest.mark.parametrize("rows", ["sliced", "reduce", "launch"])
@pytest.mark.parametrize("G", [2, 3, 4, 5, 6, 7, 8, 16, 31, 40])
def test_group_score_forms_exact(monkeypatch, G, rows):
    """Every exact form of the group score (direct, bit-planes + popc(k), signed planes for even
    G) and majority, its rows derived in the scan (bit-sliced adders, or cross-thread
    reductions) or in their own launch, gives the reference's token scores bit for bit (chunk
    1: a block key is its token's score), also with 3 code words (padded to 4 in the kernel: the
    padding must not count) and tied, low-entropy codes."""
    from kvcomp.ops.hamming_topk.reference import token_scores_ref

    monkeypatch.setattr(kernels, "ROWS_IN_SCAN", rows != "launch")
    monkeypatch.setattr(kernels, "SLICED_ROWS", rows == "sliced")
    gen = torch.Generator().manual_seed(G + 10 * len(rows))
    modes = ["exact", "exact_direct", "exact_planes"] + (["exact_signed"] if G % 2 == 0 else [])
    for W, low in ((3, False), (2, True)):
        q = codes(2, 2 * G, W, low_entropy=low, gen=gen)
        k = codes(2, 2, 37, W, low_entropy=low, gen=gen)
        lens = torch.tensor([37, 20])
        want = token_scores_ref(q, k)  # [B, Hkv, L] int32
        for mode in modes:
            keys = kernels.block_keys_triton(q, k, lens, 1, "max", mode)
            assert torch.equal(keys[0], want[0]), (mode, W)
            assert torch.equal(keys[1, :, :20], want[1, :, :20]), (mode, W)
        want = token_scores_ref(majority_codes(q, 2), k)
        keys = kernels.block_keys_triton(q, k, lens, 1, "max", "majority")
        assert torch.equal(keys[0], want[0]) and torch.equal(keys[1, :, :20], want[1, :, :20]), W
    # every query code equal: c_b = G wherever a bit is set, the largest count the rows see
    # (a bit-sliced counter one plane short wraps it around: G >= 32 must not take that path)
    q = q[:, :1].expand(-1, 2 * G, -1).contiguous()
    for mode in modes + ["majority"]:
        want = token_scores_ref(majority_codes(q, 2) if mode == "majority" else q, k)
        keys = kernels.block_keys_triton(q, k, lens, 1, "max", mode)
        assert torch.equal(keys[0], want[0]) and torch.equal(keys[1, :, :20], want[1, :, :20]), mode
    if G % 2:
        with pytest.raises(ValueError, match="even group size"):
            kernels.block_keys_triton(q, k, lens, 1, "max", "exact_signed")


@pytest.mark.parametrize("G", [32, 40, 64, 127])
def test_sliced_rows_of_wide_groups(monkeypatch, G):
    """``_sliced_rows`` with 6 and 7 planes of per-bit counts (G up to 127: what the tensor-core
    scan takes for a verify step's G x T rows; the SIMT scan takes them here through
    ``SLICED_MAX_BITS``): every exact form and majority gives the reference's token scores bit for
    bit, also where every query code is equal (c_b = G, the largest count: a counter one plane
    short would wrap it around)."""
    from kvcomp.ops.hamming_topk.reference import token_scores_ref

    monkeypatch.setattr(kernels, "SLICED_MAX_BITS", 7)
    gen = torch.Generator().manual_seed(G)
    W = 4
    q = codes(1, 2 * G, W, gen=gen)
    k = codes(1, 2, 19, W, gen=gen)
    lens = torch.tensor([19])
    modes = ["exact", "exact_planes"] + (["exact_signed"] if G % 2 == 0 else [])
    for qq in (q, q[:, :1].expand(-1, 2 * G, -1).contiguous()):
        for mode in modes + ["majority"]:
            want = token_scores_ref(majority_codes(qq, 2) if mode == "majority" else qq, k)
            keys = kernels.block_keys_triton(qq, k, lens, 1, "max", mode)
            assert torch.equal(keys, want), (mode, G)


def test_exact_form_choice():
    """Popcounts a code word: the signed planes where they are the fewest (even G >= 4)."""
    assert kernels._form(4, "exact") == (kernels.FORM_SIGNED, False, 3)
    assert kernels._form(8, "exact") == (kernels.FORM_SIGNED, False, 4)
    assert kernels._form(2, "exact") == (kernels.FORM_XOR, False, 2)
    assert kernels._form(7, "exact") == (kernels.FORM_PLANES, False, 3)
    assert kernels._form(3, "exact") == (kernels.FORM_XOR, False, 3)
    assert kernels._form(8, "majority") == (kernels.FORM_XOR, True, 1)


def test_majority_equals_reference_on_majority_codes():
    gen = torch.Generator().manual_seed(7)
    q = codes(2, 8, 2, gen=gen)
    k = codes(2, 2, 129, 2, gen=gen)
    lens = torch.tensor([129, 100])
    got = hamming_topk(q, k, lens, k_blocks=6, chunk_size=4, mode="majority", backend="triton")
    qm = majority_codes(q, 2)
    want = hamming_topk(qm, k, lens, k_blocks=6, chunk_size=4, backend="reference")
    assert torch.equal(got, want)


@pytest.mark.parametrize("chunk", [1, 16, 100, 512])
def test_chunk_sizes(chunk):
    gen = torch.Generator().manual_seed(chunk)
    B, Hkv, G, W, L = 2, 2, 4, 1, 1000
    q = codes(B, Hkv * G, W, gen=gen)
    k = codes(B, Hkv, L, W, low_entropy=True, gen=gen)
    lens = torch.tensor([1000, 257])
    got, want = both(q, k, lens, k_blocks=3, chunk_size=chunk, must_select=(0, -1))
    assert torch.equal(got, want)


@pytest.mark.parametrize("must", [(), (0, -2, -1), (0, 0, -1, 5, -100, 100)])
def test_must_select_and_tensor_budget(must):
    gen = torch.Generator().manual_seed(len(must))
    B, Hkv, G, W, L = 4, 2, 2, 2, 200
    q = codes(B, Hkv * G, W, low_entropy=True, gen=gen)
    k = codes(B, Hkv, L, W, low_entropy=True, gen=gen)
    lens = torch.tensor([200, 31, 96, 17])
    kb = torch.tensor([2, 9, 1, 30])
    got, want = both(q, k, lens, k_blocks=kb, max_blocks=12, chunk_size=8, must_select=must)
    assert got.shape == (B, Hkv, 12)
    assert torch.equal(got, want)


def test_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(3)
    big = codes(2, 300, 4, 3, gen=gen)  # token-major layout [B, L, Hkv, W'] sliced to W = 2
    k = big.permute(0, 2, 1, 3)[..., :2]  # [B, Hkv=4, L, W=2]
    q = codes(2, 8, 4, gen=gen)[..., ::2]  # [B, Hq=8, W=2], word stride 2
    assert not k.is_contiguous() and not q.is_contiguous()
    lens = torch.tensor([300, 129])
    got, want = both(q, k, lens, k_blocks=5, chunk_size=16)
    assert torch.equal(got, want)


def test_selection_reading_tiles(monkeypatch):
    """Rows with more blocks than the selection keeps in registers (the tiled path)."""
    monkeypatch.setattr(kernels, "SELECT_BLOCK_MAX", 16)
    gen = torch.Generator().manual_seed(11)
    q = codes(2, 4, 1, low_entropy=True, gen=gen)
    k = codes(2, 2, 400, 1, low_entropy=True, gen=gen)
    lens = torch.tensor([400, 130])
    for repre in ("max", "mean"):
        got, want = both(q, k, lens, k_blocks=37, chunk_size=4, chunk_repre=repre)
        assert torch.equal(got, want)


@pytest.mark.parametrize("arity", [4, 16])
def test_threshold_search_arity(monkeypatch, arity):
    """The ARITY-ary threshold search picks the same blocks as the reference (binary is the
    default, tested everywhere else)."""
    monkeypatch.setattr(kernels, "SELECT_ARITY", arity)
    gen = torch.Generator().manual_seed(arity)
    q = codes(2, 4, 2, gen=gen)
    k = codes(2, 2, 300, 2, low_entropy=True, gen=gen)
    lens = torch.tensor([300, 77])
    for repre in ("max", "mean"):
        got, want = both(q, k, lens, k_blocks=6, chunk_size=8, chunk_repre=repre)
        assert torch.equal(got, want)


@pytest.mark.parametrize("repre", ["max", "mean"])
def test_fused_selection(monkeypatch, repre):
    """Selection run by the last scan program of each row (no second launch): same result, the
    row counters are back to zero after the call, also with several programs per row."""
    monkeypatch.setattr(kernels, "FUSED_SELECT", True)
    gen = torch.Generator().manual_seed(13)
    q = codes(3, 4, 2, low_entropy=True, gen=gen)
    k = codes(3, 2, 2000, 2, low_entropy=True, gen=gen)
    lens = torch.tensor([2000, 1, 700])
    for kb in (7, torch.tensor([3, 9, 1])):
        got, want = both(q, k, lens, k_blocks=kb, max_blocks=9, chunk_size=16, chunk_repre=repre)
        assert torch.equal(got, want)
    assert (kernels._row_counters(6, torch.device("cpu"))[:6] == 0).all()


def test_stage_buffers_poisoned():
    """Stage 1 writes exactly the real blocks' keys (nothing over padding); stage 2 writes every
    output entry."""
    from kvcomp.ops.hamming_topk.reference import block_scores_ref, token_scores_ref

    gen = torch.Generator().manual_seed(12)
    q = codes(2, 4, 1, gen=gen)
    k = codes(2, 2, 256, 1, gen=gen)
    lens = torch.tensor([256, 40])
    keys = torch.full((2, 2, 16), -999, dtype=torch.int32)
    kernels.block_keys_triton(q, k, lens, 16, "max", out=keys)
    want = block_scores_ref(token_scores_ref(q, k), lens, 16, "max")
    assert torch.equal(keys[0].double(), want[0])
    assert torch.equal(keys[1, :, :3].double(), want[1, :, :3])
    assert (keys[1, :, 3:] == -999).all()
    out = torch.full((2, 2, 9), -777, dtype=torch.int32)
    kernels.select_triton(keys, lens, torch.tensor([4, 4]), 9, 16, (0, -1), out=out)
    assert not (out == -777).any()
    want_idx = hamming_topk(q, k, lens, k_blocks=4, max_blocks=9, chunk_size=16,
                            must_select=(0, -1), backend="reference")
    assert torch.equal(out, want_idx)


GPU_CASES = [(G, "exact") for G in (1, 2, 4, 8, 16)] + [
    (8, "exact_direct"), (8, "majority"), (4, "exact_planes")
]


@pytest.mark.gpu
@pytest.mark.parametrize("G,mode", GPU_CASES)
def test_gpu_real_shapes(G, mode):
    gen = torch.Generator().manual_seed(G)
    B, Hkv, W, L = 4, 8, 4, 4097
    q = codes(B, Hkv * G, W, gen=gen, device="cuda")
    k = codes(B, Hkv, L, W, gen=gen, device="cuda")
    lens = torch.tensor([4097, 1, 127, 2050], device="cuda")
    for repre in ("max", "mean"):
        got, want = both(q, k, lens, k_blocks=7, chunk_size=128, chunk_repre=repre, mode=mode)
        assert torch.equal(got, want)
    kl = codes(B, Hkv, L, W, low_entropy=True, gen=gen, device="cuda")
    got, want = both(q & 7, kl, lens, k_blocks=7, chunk_size=16, mode=mode)
    assert torch.equal(got, want)


def test_mma_scan_cases():
    """Which calls the tensor-core scan takes (``mma_form_ok``), by the same ``_form`` choice
    ``block_keys_triton`` makes; CPU tensors and the interpreter never take it."""
    ms = importlib.import_module("kvcomp.ops.hamming_topk.mma_scan")

    def ok(G=4, mode="exact", chunk=128, W=4, repre="max", weighted=False, contiguous=True):
        form, majority, _ = kernels._form(G, mode)
        return ms.mma_form_ok(W, G, form, majority, chunk, repre, weighted, contiguous)

    assert all(ok(G=G) for G in (4, 6, 8, 16, 30, 32, 64))  # 32 / 64: verify steps' G x T rows
    assert all(ok(chunk=c) for c in (16, 32, 64, 128, 256, 512))
    assert not any(ok(G=G) for G in (1, 2, 3, 5, 33, 66, 128))  # direct (G <= 2), odd G, > MMA_MAX_G
    assert not ok(mode="majority") and not ok(mode="exact_planes") and not ok(mode="exact_direct")
    assert not any(ok(chunk=c) for c in (1, 8, 48, 100, 192, 0, 384, 1024))
    assert not ok(W=2) and not ok(W=8) and not ok(repre="mean") and not ok(repre="lse")
    assert not ok(weighted=True) and not ok(contiguous=False)
    q = codes(1, 8, 4)
    k = codes(1, 2, 256, 4)
    assert not kernels._mma_scan_takes(q, k, 128, "max", "exact", None, None, None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("G,chunk", [(G, c) for G in (4, 8, 16) for c in (16, 32, 64, 128, 256, 512)]
                         + [(32, 128), (32, 16), (64, 128)])  # verify steps: G x T rows
def test_gpu_mma_scan(monkeypatch, G, chunk):
    """The tensor-core scan (``mma_scan``, the default for 128-bit codes and even G) against the
    SIMT scan block key for block key (keys of the real blocks; the buffers poisoned first) and
    against the reference's selection: ragged lengths 1, 127, 129, 4097, one tile a program and
    several, few rows (the histogram path) and many (the search), the first warp tile's codes
    loaded early (``MMA_FIRST_EARLY``) or in the loop."""
    ms = importlib.import_module("kvcomp.ops.hamming_topk.mma_scan")
    gen = torch.Generator().manual_seed(G * 1000 + chunk)
    W, L = 4, 4097
    for B, Hkv, target in ((4, 2, 8192), (12, 8, 8192), (4, 2, 1)):
        monkeypatch.setattr(ms, "MMA_TARGET_PROGRAMS", target)
        q = codes(B, Hkv * G, W, gen=gen, device="cuda")
        k = codes(B, Hkv, L, W, low_entropy=target == 1, gen=gen, device="cuda")
        lens = torch.tensor([4097, 1, 127, 129] * (B // 4), device="cuda")
        assert kernels._mma_scan_takes(q, k, chunk, "max", "exact", None, None, None, None)
        nb = -(-L // chunk)
        keys = {}
        for mma, first in ((True, True), (True, False), (False, True)):
            monkeypatch.setattr(ms, "MMA_SCAN", mma)
            monkeypatch.setattr(ms, "MMA_FIRST_EARLY", first)
            out = torch.full((B, Hkv, nb), -7, dtype=torch.int32, device="cuda")
            keys[mma, first] = kernels.block_keys_triton(q, k, lens, chunk, "max", out=out)
        real = torch.arange(nb, device="cuda")[None, None, :] < ((lens + chunk - 1) // chunk)[:, None, None]
        simt = keys[False, True][real.expand_as(keys[False, True])]
        for first in (True, False):
            assert torch.equal(keys[True, first][real.expand_as(keys[True, first])], simt), first
        monkeypatch.setattr(ms, "MMA_SCAN", True)
        monkeypatch.setattr(ms, "MMA_FIRST_EARLY", True)
        got, want = both(q, k, lens, k_blocks=5, chunk_size=chunk, must_select=(0, -1))
        assert torch.equal(got, want), (B, Hkv, target)


@pytest.mark.gpu
@pytest.mark.parametrize("G", [4, 8])
def test_gpu_fused_selection(monkeypatch, G):
    monkeypatch.setattr(kernels, "FUSED_SELECT", True)
    gen = torch.Generator().manual_seed(G)
    B, Hkv, W, L = 4, 8, 4, 4097
    q = codes(B, Hkv * G, W, gen=gen, device="cuda")
    lens = torch.tensor([4097, 1, 127, 2050], device="cuda")
    for rep in range(3):  # the row counters must be reset between launches
        k = codes(B, Hkv, L, W, low_entropy=rep == 1, gen=gen, device="cuda")
        got, want = both(q, k, lens, k_blocks=7, chunk_size=16 if rep == 2 else 128)
        assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_token_level_long():
    gen = torch.Generator().manual_seed(99)
    q = codes(2, 32, 4, gen=gen, device="cuda")
    k = codes(2, 8, 8192, 4, gen=gen, device="cuda")
    lens = torch.tensor([8192, 5000], device="cuda")
    got, want = both(q, k, lens, k_blocks=300, chunk_size=1)
    assert torch.equal(got, want)


def _hist_vs_search(q, k, lens, monkeypatch, **kw):
    """The histogram threshold (its one-prefix-sum stage 2, the default, with bins of 4 scores
    (``HIST_STEP4``; even G) too, and the previous one) and the binary search give the
    reference's selection."""
    want = hamming_topk(q, k, lens, backend="reference", **kw)
    monkeypatch.setattr(kernels, "HIST_SELECT", False)
    searched = hamming_topk(q, k, lens, backend="triton", **kw)
    monkeypatch.setattr(kernels, "HIST_SELECT", True)
    monkeypatch.setattr(kernels, "HIST_COMPACT", False)
    hist_v1 = hamming_topk(q, k, lens, backend="triton", **kw)
    monkeypatch.setattr(kernels, "HIST_COMPACT", True)
    monkeypatch.setattr(kernels, "HIST_STEP4", False)
    hist = hamming_topk(q, k, lens, backend="triton", **kw)
    monkeypatch.setattr(kernels, "HIST_STEP4", True)
    hist4 = hamming_topk(q, k, lens, backend="triton", **kw)
    assert torch.equal(hist4, want)
    assert torch.equal(searched, want)
    assert torch.equal(hist_v1, want)
    assert torch.equal(hist, want)


@pytest.mark.parametrize("G,mode", [(1, "exact"), (2, "exact"), (3, "exact"), (4, "exact"), (4, "majority"),
                                    (8, "exact")])
def test_histogram_threshold_equals_search(monkeypatch, G, mode):
    gen = torch.Generator().manual_seed(7 * G)
    B, Hkv, W, L = 3, 2, 2, 700
    lens = torch.tensor([700, 1, 129])
    for rep in range(4):  # each launch must find its row histograms zeroed by the previous one
        low = rep in (1, 3)  # many equal keys: the tie rule decides
        q = codes(B, Hkv * G, W, low_entropy=low, gen=gen)
        k = codes(B, Hkv, L, W, low_entropy=low, gen=gen)
        # rep 3: every block of the short rows, all but a few of the long one
        kb = {2: torch.tensor([5, 1, 0]), 3: torch.tensor([40, 3, 9])}.get(rep, 6)
        _hist_vs_search(q, k, lens, monkeypatch, k_blocks=kb, max_blocks=40, chunk_size=16,
                        must_select=(0, -1, 0, -2, 400), mode=mode)
    hist = kernels._hist_args(G, W, mode, 1, torch.device("cpu"))  # bins of width 2: scores are even
    assert (hist["NBINS"] - 1) * hist["KSTEP"] >= 2 * 64 * (1 if mode == "majority" else G)


@pytest.mark.parametrize("G,mode", [(4, "exact"), (8, "majority")])
def test_fused_histogram_selection(monkeypatch, G, mode):
    """FUSED_HIST_SELECT: the row's last scan program runs the histogram stage 2 (no second
    launch); same selection as the reference over launches in a row (each must find the row
    histograms and ticket counters zeroed by the one before), several programs per row."""
    monkeypatch.setattr(kernels, "FUSED_HIST_SELECT", True)
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 64)
    gen = torch.Generator().manual_seed(3 * G)
    B, Hkv, W, L = 2, 2, 2, 900
    lens = torch.tensor([900, 129])
    for rep in range(3):
        low = rep == 1
        q = codes(B, Hkv * G, W, low_entropy=low, gen=gen)
        k = codes(B, Hkv, L, W, low_entropy=low, gen=gen)
        kb = torch.tensor([9, 2]) if rep == 2 else 6
        kw = dict(k_blocks=kb, max_blocks=9, chunk_size=16, must_select=(0, -2, -1, 0), mode=mode)
        got, want = both(q, k, lens, **kw)
        assert torch.equal(got, want)
    assert (kernels._row_counters(B * Hkv, torch.device("cpu"))[: B * Hkv] == 0).all()


def test_histogram_threshold_many_blocks(monkeypatch):
    """More blocks than one selection program holds (the multi-pass path) and a row whose
    count is all must-select blocks."""
    monkeypatch.setattr(kernels, "SELECT_BLOCK_MAX", 64)
    gen = torch.Generator().manual_seed(5)
    q = codes(2, 4, 1, low_entropy=True, gen=gen)
    k = codes(2, 2, 300, 1, low_entropy=True, gen=gen)
    lens = torch.tensor([300, 250])
    _hist_vs_search(q, k, lens, monkeypatch, k_blocks=torch.tensor([40, 2]), max_blocks=40,
                    chunk_size=2, must_select=(0, -2, -1))


@pytest.mark.parametrize("G,W,mode,max_bins", [(4, 2, "exact", 16), (8, 4, "exact", 64), (3, 2, "exact", 32),
                                                (8, 2, "majority", 16), (128, 2, "exact", 64)])
@pytest.mark.parametrize("single", [True, False])
def test_coarse_histogram_bins(monkeypatch, G, W, mode, max_bins, single):
    """HIST_COARSE: scores too wide for one bin a value (here HIST_MAX_BINS made small) take bins
    of several values and stage 2 searches T's bin: the reference's selection, tied keys (low
    entropy) and distinct ones, ragged lengths, tensor k_blocks, must-select entries repeated
    and out of range, the row in one tile and in several (``single``), launches in a row."""
    monkeypatch.setattr(kernels, "HIST_MAX_BINS", max_bins)
    monkeypatch.setattr(kernels, "HIST_COARSE", True)
    if not single:
        monkeypatch.setattr(kernels, "SELECT_BLOCK_MAX", 16)
    hist = kernels._hist_args(G, W, mode, 4, torch.device("cpu"))
    assert hist["COARSE"] and hist["NBINS"] <= max_bins
    assert hist["KSTEP"] * (hist["NBINS"] - 1) >= 2 * (1 if mode == "majority" else G) * 32 * W
    gen = torch.Generator().manual_seed(G * 31 + W + single)
    B, Hkv, L = 2, 2, 700
    lens = torch.tensor([700, 129])
    for rep in range(3):
        low = rep == 1
        q = codes(B, Hkv * G, W, low_entropy=low, gen=gen)
        k = codes(B, Hkv, L, W, low_entropy=low, gen=gen)
        kb = torch.tensor([9, 3]) if rep == 2 else 6
        kw = dict(k_blocks=kb, max_blocks=9, chunk_size=16, must_select=(0, -1, 0, 400), mode=mode)
        got, want = both(q, k, lens, **kw)
        assert torch.equal(got, want), rep
    monkeypatch.setattr(kernels, "HIST_COARSE", False)
    assert kernels._hist_args(G, W, mode, 4, torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.parametrize("G,mode", [(4, "exact"), (8, "exact"), (8, "majority")])
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_histogram_threshold(monkeypatch, G, mode, fused):
    """Real shapes with few rows (B * Hkv = 16 <= HIST_MAX_ROWS: the histogram path), uniform
    and tied keys, ragged lengths, must-select edge entries; three launches in a row. fused:
    stage 2 in the scan's launch (FUSED_HIST_SELECT)."""
    monkeypatch.setattr(kernels, "FUSED_HIST_SELECT", fused)
    gen = torch.Generator().manual_seed(40 + G)
    B, Hkv, W, L = 2, 8, 4, 4097
    assert kernels._hist_args(G, W, mode, B * Hkv, torch.device("cuda")) is not None
    lens = torch.tensor([4097, 129], device="cuda")
    for rep in range(3):
        low = rep == 1
        q = codes(B, Hkv * G, W, low_entropy=low, gen=gen, device="cuda")
        k = codes(B, Hkv, L, W, low_entropy=low, gen=gen, device="cuda")
        kb = torch.tensor([16, 2], device="cuda") if rep == 2 else 7
        _hist_vs_search(q, k, lens, monkeypatch, k_blocks=kb, max_blocks=16, chunk_size=128 if rep else 16,
                        must_select=(0, -2, -1, 0), mode=mode)


@pytest.mark.parametrize("target", [1, 12])  # 3 tiles a program; 2 + 1
@pytest.mark.parametrize("mode", ["exact", "majority"])
def test_several_tiles_per_program(monkeypatch, target, mode):
    """Few programs (TARGET_PROGRAMS, as at large batches on the GPU): each scan program loops
    over several tiles, its last one cut by the row's end; ragged rows, the histogram path and
    the search path give the reference's selection, "mean" blocks too."""
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", target)
    monkeypatch.setattr(kernels, "BLOCK_T", 64)  # 64-token tiles at 128 bits: 16 at 32 bits
    gen = torch.Generator().manual_seed(target + (mode == "majority"))
    B, Hkv, G, W, L = 3, 2, 4, 1, 700
    q = codes(B, Hkv * G, W, gen=gen)
    k = codes(B, Hkv, L, W, gen=gen)
    lens = torch.tensor([700, 1, 333])
    for repre in ("max", "mean"):
        for hist in (True, False):
            monkeypatch.setattr(kernels, "HIST_SELECT", hist)
            got = hamming_topk(q, k, lens, k_blocks=7, chunk_size=8, chunk_repre=repre, mode=mode,
                               backend="triton")
            qr = majority_codes(q, Hkv) if mode == "majority" else q
            want = hamming_topk(qr, k, lens, k_blocks=7, chunk_size=8, chunk_repre=repre, backend="reference")
            assert torch.equal(got, want), (repre, hist)


@pytest.mark.parametrize("chunk", [100, 300])
def test_blocks_larger_than_a_tile(monkeypatch, chunk):
    """Chunks larger than a tile (256 tokens a tile at 32 bits here: 300 -> 2 sub-tiles of 256,
    the second cut by the chunk's end; 100 -> 128-token sub-blocks cut at 100) and several
    tiles a program: "max", "mean" and key norms give the reference's selection."""
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 1)
    monkeypatch.setattr(kernels, "BLOCK_T", 64)
    gen = torch.Generator().manual_seed(chunk)
    B, Hkv, G, W, L = 2, 2, 4, 1, 1000
    q = codes(B, Hkv * G, W, gen=gen)
    k = codes(B, Hkv, L, W, low_entropy=True, gen=gen)
    lens = torch.tensor([1000, 601])
    ks = torch.rand(B, Hkv, L, generator=gen) + 0.5
    for repre, scale in (("max", None), ("mean", None), ("max", ks)):
        got = hamming_topk(q, k, lens, k_blocks=2, chunk_size=chunk, chunk_repre=repre, k_scale=scale,
                           must_select=(-1,), backend="triton")
        want = hamming_topk(q, k, lens, k_blocks=2, chunk_size=chunk, chunk_repre=repre, k_scale=scale,
                            must_select=(-1,), backend="reference")
        assert torch.equal(got, want), (repre, scale is not None)
