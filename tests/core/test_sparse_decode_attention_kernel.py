"""Triton ``sparse_decode_attention`` against an fp64 reference with flash-attention's tolerance
rule (kernel error <= 2x the error of plain torch in the same precision, plus a small atol).

CPU cases under TRITON_INTERPRET=1 at small shapes; ``-m gpu`` at real ones. Output and split
buffers are filled with NaN before every kernel call so an unwritten element fails."""

import importlib
import math

import pytest
import torch
from kvcomp.bench.timing import attention_close, attention_ref_fp64, attention_ref_lowp
from kvcomp.ops import sparse_decode_attention
from kvcomp.ops._blocks import selected_token_mask

kernels = importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison_scratch(monkeypatch):
    monkeypatch.setattr(kernels, "POISON_SCRATCH", True)


def random_selection(B, Hkv, n_blocks, K, gen, drop=0.3):
    """[B, Hkv, K] distinct block indices per row (random order), some entries -1."""
    rows = []
    for _ in range(B * Hkv):
        perm = torch.randperm(max(n_blocks, K), generator=gen)[:K]
        perm = torch.where(perm < n_blocks, perm, -1)
        perm = torch.where(torch.rand(K, generator=gen) < drop, -1, perm)
        rows.append(perm)
    return torch.stack(rows).view(B, Hkv, K).to(torch.int32)


def case_inputs(B, Hkv, G, D, L, T, K, chunk, gen, drop, pins=()):
    """q ([B, Hkv * G, D], or [B, Hkv * G, T, D] for T > 1 queries a sequence), k, v [B, Hkv, L,
    D] fp32 on the CPU, and a random selection [B, Hkv, K] with block ``blk`` at entry ``e`` of
    sequence ``b`` for each (b, e, blk) of ``pins`` and nowhere else in that row (entries stay
    distinct: the kernel's contract)."""
    shape_q = (B, Hkv * G, T, D) if T > 1 else (B, Hkv * G, D)
    q = torch.randn(*shape_q, generator=gen)
    k = torch.randn(B, Hkv, L, D, generator=gen)
    v = torch.randn(B, Hkv, L, D, generator=gen)
    idx = random_selection(B, Hkv, -(-L // chunk), K, gen, drop=drop)
    for b_, e, blk in pins:
        idx[b_] = torch.where(idx[b_] == blk, -1, idx[b_])
        idx[b_, :, e] = blk
    return q, k, v, idx


def last_block_pins(lens, chunk):
    """Pins of the block holding each sequence's last token at entry 0 (several queries a
    sequence attend to their own new tokens)."""
    return [(b_, 0, (int(n) - 1) // chunk) for b_, n in enumerate(lens)]


def check(q, k, v, idx, lens, chunk, scale=None, atol=1e-5):
    D = q.shape[-1]
    scale = scale if scale is not None else 1 / math.sqrt(D)
    out = torch.full_like(q, float("nan"))
    got = sparse_decode_attention(
        q, k, v, idx, lens, chunk_size=chunk, scale=scale, out=out, backend="triton"
    )
    assert got.data_ptr() == out.data_ptr()
    mask = selected_token_mask(idx.to(k.device), lens, k.shape[2], chunk)
    ref64 = attention_ref_fp64(q, k, v, mask, scale)
    lowp = attention_ref_lowp(q, k, v, mask, scale)
    ok, err, base = attention_close(got, ref64, lowp, atol=atol)
    assert ok, f"kernel error {err:.3g} > 2 x torch {q.dtype} error {base:.3g} + {atol}"
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_gqa_ragged(G, dtype):
    gen = torch.Generator().manual_seed(G)
    B, Hkv, D, L, chunk = 3, 2, 32, 300, 16
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    lens = torch.tensor([300, 129, 1])
    idx = random_selection(B, Hkv, 19, 7, gen)
    idx[2, :, 0] = 0  # the length-1 row attends its only token
    check(q, k, v, idx, lens, chunk)


@pytest.mark.parametrize("chunk", [1, 16, 100])
def test_chunk_sizes_and_lengths(chunk):
    gen = torch.Generator().manual_seed(chunk)
    B, Hkv, G, D, L = 3, 2, 4, 64, 1000
    q = torch.randn(B, Hkv * G, D, generator=gen).half()
    k = torch.randn(B, Hkv, L, D, generator=gen).half()
    v = torch.randn(B, Hkv, L, D, generator=gen).half()
    lens = torch.tensor([1000, 127, 129])
    nb = -(-L // chunk)
    idx = random_selection(B, Hkv, nb, min(nb, 9), gen, drop=0.1)
    check(q, k, v, idx, lens, chunk)


def test_all_blocks_equals_dense_and_empty_rows_are_zero():
    gen = torch.Generator().manual_seed(5)
    B, Hkv, G, D, L, chunk = 3, 2, 2, 32, 129, 16
    q = torch.randn(B, Hkv * G, D, generator=gen)
    k = torch.randn(B, Hkv, L, D, generator=gen)
    v = torch.randn(B, Hkv, L, D, generator=gen)
    lens = torch.tensor([129, 63, 0])
    idx = torch.arange(9, dtype=torch.int32).expand(B, Hkv, 9).contiguous()
    got = check(q, k, v, idx, lens, chunk)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q[:1, :, None], k[:1].repeat_interleave(G, 1), v[:1].repeat_interleave(G, 1)
    )[:, :, 0]
    torch.testing.assert_close(got[:1], dense, atol=1e-5, rtol=1e-5)
    assert (got[2] == 0).all()
    none = torch.full((B, Hkv, 4), -1, dtype=torch.int32)
    assert (check(q, k, v, none, lens, chunk) == 0).all()


def test_noncontiguous_caches_and_query():
    gen = torch.Generator().manual_seed(6)
    B, Hkv, G, D, L, chunk = 2, 2, 4, 32, 200, 16
    kv = torch.randn(2, B, L, Hkv, D, generator=gen).bfloat16()  # token-major, K and V in one
    k = kv[0].transpose(1, 2)  # [B, Hkv, L, D] with strides of [B, L, Hkv, D]
    v = kv[1].transpose(1, 2)
    q = torch.randn(B, D, Hkv * G, generator=gen).bfloat16().transpose(1, 2)  # [B, Hq, D]
    assert not (k.is_contiguous() or v.is_contiguous() or q.is_contiguous())
    idx = random_selection(B, Hkv, 13, 5, gen).transpose(1, 2).contiguous().transpose(1, 2)
    check(q, k, v, idx, torch.tensor([200, 129]), chunk, scale=0.2)


def test_many_splits(monkeypatch):
    """Force many splits per row: the merge must combine them, empty splits included."""
    monkeypatch.setattr(kernels, "MIN_TILES_PER_SPLIT", 1)
    gen = torch.Generator().manual_seed(7)
    B, Hkv, G, D, L, chunk = 1, 1, 8, 16, 1100, 64
    q = torch.randn(B, Hkv * G, D, generator=gen)
    k = torch.randn(B, Hkv, L, D, generator=gen) * 3
    v = torch.randn(B, Hkv, L, D, generator=gen)
    idx = torch.tensor([[[3, -1, 0, 17, 9, -1, 12, 5, 16]]], dtype=torch.int32)
    assert kernels._plan(B, Hkv, 9, chunk, D)[2] == 9
    check(q, k, v, idx, torch.tensor([1050]), chunk)


def test_many_rows_take_shorter_splits():
    """From MANY_ROWS (sequence, kv-head) rows and for groups of at most MANY_MAX_G query heads the
    plan aims at TARGET_PROGRAMS_MANY programs: Qwen3-8B and Qwen3-32B (G = 4, 8) at B = 8, 2048
    tokens: 64 rows x 8 splits of 4 tiles; G = 16 and fewer rows keep 264 (5 splits of 7). Then a
    32-row batch (many short splits, ragged, empty entries) against the reference."""
    assert kernels._plan(8, 8, 16, 128, 128, G=4) == (64, 256, 8)
    assert kernels._plan(8, 8, 16, 128, 128, G=8) == (64, 256, 8)
    assert kernels._plan(8, 8, 16, 128, 128, G=16) == (64, 448, 5)
    assert kernels._plan(4, 8, 16, 128, 128, G=4) == (64, 128, 16)
    assert kernels._plan(1, 8, 16, 128, 128) == (64, 64, 32)  # 8 rows: TARGET_PROGRAMS, one tile a split
    assert kernels._plan(2, 8, 16, 128, 128) == (128, 128, 16)  # 16 rows: long tiles
    gen = torch.Generator().manual_seed(12)
    B, Hkv, G, D, L, chunk = 4, 8, 2, 16, 400, 16
    q = torch.randn(B, Hkv * G, D, generator=gen)
    k = torch.randn(B, Hkv, L, D, generator=gen)
    v = torch.randn(B, Hkv, L, D, generator=gen)
    idx = random_selection(B, Hkv, 25, 20, gen, drop=0.2)
    assert kernels._plan(B, Hkv, 20, chunk, D, G=G)[2] == 5  # 320 tokens: 5 one-tile splits
    check(q, k, v, idx, torch.tensor([400, 390, 17, 250]), chunk)


@pytest.mark.parametrize("chunk,tile,T", [(64, 16, 1), (128, 32, 1), (32, 32, 1), (64, 16, 2)])
def test_scalar_block_entries_are_the_same_sums(monkeypatch, chunk, tile, T):
    """SCALAR_BLOCKS (a tile's block entry loaded one step ahead, where chunk_size is a multiple
    of the tile): bit for bit the per-token path, on splits of several tiles and several blocks,
    -1 entries, ragged lengths (a block cut by seq_len), several queries a sequence, and a paged
    pool; and within the rule of the fp64 reference."""
    monkeypatch.setattr(kernels, "TILE_N", tile)
    monkeypatch.setattr(kernels, "LONG_TILE_N", None)
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 8)  # few programs: splits of several tiles
    gen = torch.Generator().manual_seed(chunk + tile + T)
    B, Hkv, G, D, L = 2, 2, 2, 32, 9 * chunk
    lens = torch.tensor([L, 4 * chunk + 7])
    # the block that row 1's length cuts, and with several queries the new tokens' block of row 0
    q, k, v, idx = case_inputs(B, Hkv, G, D, L, T, 7, chunk, gen, 0.2,
                               [(1, 0, 4)] + ([(0, 1, L // chunk - 1)] if T > 1 else []))
    assert kernels._plan(B, Hkv, 7, chunk, D)[1] > tile  # splits of several tiles
    runs = {}
    for scalar in (False, True):
        monkeypatch.setattr(kernels, "SCALAR_BLOCKS", scalar)
        got = sparse_decode_attention(q, k, v, idx, lens, chunk_size=chunk, backend="triton")
        assert not got.isnan().any()
        runs[scalar] = got
    assert torch.equal(runs[True], runs[False])
    if T == 1:
        check(q, k, v, idx, lens, chunk)  # SCALAR_BLOCKS still on
        kp, vp, table = paged_from_contiguous(k, v, chunk, gen)
        paged = sparse_decode_attention(q, kp, vp, idx, lens, chunk_size=chunk, block_table=table,
                                        backend="triton")
        assert torch.equal(paged, runs[False])


def _refs(q, k, v, idx, lens, chunk):
    mask = selected_token_mask(idx, lens, k.shape[2], chunk)
    scale = 1 / math.sqrt(q.shape[-1])
    return attention_ref_fp64(q, k, v, mask, scale), attention_ref_lowp(q, k, v, mask, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("B,G,K,T", [(8, 4, 16, 1), (1, 4, 103, 1), (8, 8, 16, 1), (2, 4, 40, 3)])
def test_gpu_scalar_block_entries_are_the_same_sums(monkeypatch, B, G, K, T):
    """On the H200 at real shapes (chunk 128, 64- or 128-token tiles): SCALAR_BLOCKS gives the
    per-token path's output bit for bit, within the rule, with ragged lengths and -1 entries."""
    gen = torch.Generator().manual_seed(600 + B * G + K + T)
    Hkv, D, L, chunk = 8, 128, 32768, 128
    lens = torch.tensor([L, 20001, 129, 30000, 4097, 1, 32767, 128][:B])
    q, k, v, idx = case_inputs(B, Hkv, G, D, L, T, K, chunk, gen, 0.1, last_block_pins(lens, chunk) if T > 1 else ())
    q, k, v, idx, lens = (t.cuda() for t in (q.bfloat16(), k.bfloat16(), v.bfloat16(), idx, lens))
    outs = []
    for scalar in (False, True):
        monkeypatch.setattr(kernels, "SCALAR_BLOCKS", scalar)
        outs.append(sparse_decode_attention(q, k, v, idx, lens, chunk_size=chunk))
    assert torch.equal(outs[0], outs[1])
    if T == 1:
        check(q, k, v, idx, lens, chunk)


def test_timeline_hook_is_checked(monkeypatch):
    """TIMELINE (the profiling hook) needs the GPU: under the interpreter, and with a buffer of the
    wrong dtype, device or size, the launch refuses with an error that names the hook."""
    q = torch.randn(1, 2, 16)
    k = torch.randn(1, 1, 64, 16)
    idx = torch.zeros(1, 1, 1, dtype=torch.int32)
    lens = torch.tensor([64])
    monkeypatch.setattr(kernels, "TIMELINE", torch.zeros(64, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="TIMELINE"):
        sparse_decode_attention(q, k, k, idx, lens, chunk_size=16, backend="triton")
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="TIMELINE"):
        kernels._timeline_args(4, torch.device("cpu"))
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        for bad in (torch.zeros(4, 8, dtype=torch.int32, device=dev), torch.zeros(3, 8, dtype=torch.int64, device=dev),
                    torch.zeros(4, 8, dtype=torch.int64)):
            monkeypatch.setattr(kernels, "TIMELINE", bad)
            with pytest.raises(ValueError, match="int64 tensor"):
                kernels._timeline_args(4, dev)


@pytest.mark.gpu
@pytest.mark.parametrize("B,G,K,fused", [(8, 4, 16, True), (1, 4, 103, True), (2, 8, 40, False)])
def test_gpu_timeline_records_every_program(monkeypatch, B, G, K, fused):
    """With the TIMELINE hook the output is bit for bit the same; every program writes its row:
    increasing timestamps within the launch (the PDL wait's inside the prologue), an SM id, the
    tiles of its share, and (fused) exactly one program per (sequence, kv-head) draws the last
    ticket."""
    gen = torch.Generator().manual_seed(700 + B + K)
    Hkv, D, L, chunk = 8, 128, 32768, 128
    monkeypatch.setattr(kernels, "FUSED_MERGE", fused)
    q = torch.randn(B, Hkv * G, D, generator=gen).bfloat16().cuda()
    k = torch.randn(B, Hkv, L, D, generator=gen).bfloat16().cuda()
    v = torch.randn(B, Hkv, L, D, generator=gen).bfloat16().cuda()
    lens = torch.tensor([L, 20001, 129, 30000, 4097, 1, 32767, 128][:B], device="cuda")
    idx = random_selection(B, Hkv, L // chunk, K, gen, drop=0.1).cuda()
    want = sparse_decode_attention(q, k, v, idx, lens, chunk_size=chunk)
    block_n, per_split, splits = kernels._plan(B, Hkv, K, chunk, D, G=G)
    n = B * Hkv * splits
    tline = torch.full((n + 5, kernels.TIMELINE_COLS), -7, dtype=torch.int64, device="cuda")
    monkeypatch.setattr(kernels, "TIMELINE", tline)
    got = sparse_decode_attention(q, k, v, idx, lens, chunk_size=chunk)
    assert torch.equal(got, want)
    t = tline.cpu()
    assert (t[n:] == -7).all()  # nothing past the launch's programs
    t = t[:n]
    assert (t[:, 0] > 0).all() and (t[:, :5].diff(dim=1) >= 0).all()
    assert ((t[:, 8] >= t[:, 0]) & (t[:, 8] <= t[:, 1])).all()  # after the PDL wait: in the prologue
    assert (t[:, 9:] == -7).all()  # spare columns untouched
    assert int(t[:, 4].max() - t[:, 0].min()) < 10**8  # one launch: well under 0.1 s
    sm = t[:, 5]
    assert ((sm >= 0) & (sm < torch.cuda.get_device_properties(0).multi_processor_count)).all()
    tiles = t[:, 7].view(B * Hkv, splits)
    assert (tiles.sum(1) == triton_cdiv(K * chunk, block_n)).all()
    tickets = t[:, 6].view(B * Hkv, splits)
    if fused:
        assert (tickets.sort(1).values == torch.arange(splits)).all()
    else:
        assert (tickets == -1).all()


def triton_cdiv(a, b):
    return -(-a // b)


def test_register_cap_of_the_many_program_plan(monkeypatch):
    """The many-program plan (4 programs of 4 warps an SM for one wave) caps the split kernel at
    MANY_MAXNREG registers on the GPU; other plans keep the compiler's choice; MAXNREG overrides;
    the interpreter takes no cap."""
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    assert kernels.WARPS * 32 * kernels.MANY_MAXNREG * 4 <= 65536
    assert kernels._maxnreg(8, 8, 4) == kernels.MANY_MAXNREG == 128  # Qwen3-8B, B = 8
    assert kernels._maxnreg(4, 8, 4) == 128
    assert kernels._maxnreg(8, 8, 8) == 128  # Qwen3-32B
    assert kernels._maxnreg(8, 8, 16) is None  # G = 16 keeps 264 programs
    assert kernels._maxnreg(1, 8, 4) is None
    monkeypatch.setattr(kernels, "MAXNREG", 96)
    assert kernels._maxnreg(1, 8, 4) == 96
    monkeypatch.setattr(kernels, "interpreting", lambda: True)
    assert kernels._maxnreg(8, 8, 4) is None


@pytest.mark.parametrize("fused", [True, False])
def test_long_tiles_where_splits_hold_several(monkeypatch, fused):
    """Few programs for many selected tokens: splits of several tiles take LONG_TILE_N-token
    tiles at few rows (a ragged last tile, empty entries, a ragged batch)."""
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 6)
    monkeypatch.setattr(kernels, "FUSED_MERGE", fused)
    gen = torch.Generator().manual_seed(9)
    B, Hkv, G, D, L, chunk = 2, 2, 4, 32, 1500, 16
    q = torch.randn(B, Hkv * G, D, generator=gen).bfloat16()
    k = torch.randn(B, Hkv, L, D, generator=gen).bfloat16()
    v = torch.randn(B, Hkv, L, D, generator=gen).bfloat16()
    idx = random_selection(B, Hkv, 94, 41, gen, drop=0.1)
    block_n, per_split, splits = kernels._plan(B, Hkv, 41, chunk, D)
    assert block_n == kernels.LONG_TILE_N == 128 and per_split == 3 * block_n and splits == 2
    check(q, k, v, idx, torch.tensor([1500, 1001]), chunk)
    assert kernels._plan(B, 2 * kernels.LONG_TILE_MAX_ROWS, 41, chunk, D)[0] == kernels.TILE_N  # many rows
    monkeypatch.setattr(kernels, "LONG_TILE_N", None)
    assert kernels._plan(B, Hkv, 41, chunk, D)[0] == kernels.TILE_N


def _two_kernel(monkeypatch):
    """Context: the split kernel + separate merge kernel (FUSED_MERGE off) inside the block."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        monkeypatch.setattr(kernels, "FUSED_MERGE", False)
        try:
            yield
        finally:
            monkeypatch.setattr(kernels, "FUSED_MERGE", True)

    return ctx()


class _Refuse:
    """Stands in for a kernel that must not launch: records the attempt, launches nothing."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(grid)

        return launch


@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_fused_merge_matches_two_kernel_path(monkeypatch, G):
    """The merge run by the last split program of each row (ticket counters) gives the two-kernel
    path's output, on repeated calls with different shapes and split counts: a ticket left
    non-zero by one call would leave the next call's rows unmerged (NaN, from the poisoned
    output) or merged early. Every ticket is zero afterwards."""
    monkeypatch.setattr(kernels, "MERGE_TILE_ELEMS", 1)  # one split per merge step: unrolled
    # steps (<= 8 splits) and the loop (more)
    assert kernels.FUSED_MERGE
    gen = torch.Generator().manual_seed(100 + G)
    cases = [  # B, Hkv, L, lens, K (blocks), chunk
        (3, 2, 4097, [4097, 1, 129], 12, 64),
        (2, 2, 300, [127, 300], 9, 16),
        (1, 3, 129, [129], 2, 64),
    ]
    for B, Hkv, L, lens, K, chunk in cases:
        D = 16
        q = torch.randn(B, Hkv * G, D, generator=gen).half()
        k = torch.randn(B, Hkv, L, D, generator=gen).half()
        v = torch.randn(B, Hkv, L, D, generator=gen).half()
        lens_t = torch.tensor(lens)
        idx = random_selection(B, Hkv, -(-L // chunk), K, gen, drop=0.2)
        idx[idx == 0] = -1
        idx[:, :, 0] = 0  # every row attends at least its first token (entries stay distinct)
        assert kernels._plan(B, Hkv, K, chunk, D)[2] >= 2  # several splits to merge
        fused = check(q, k, v, idx, lens_t, chunk)
        with _two_kernel(monkeypatch):
            two = check(q, k, v, idx, lens_t, chunk)
        torch.testing.assert_close(fused.float(), two.float(), atol=1e-2, rtol=0)
        # rows whose partials exceed FUSED_MERGE_MAX_BYTES take the two-kernel path
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "FUSED_MERGE_MAX_BYTES", G * 2 * D * 4)
            torch.testing.assert_close(check(q, k, v, idx, lens_t, chunk), two, atol=0, rtol=0)
            # ... or, with FUSED_MERGE_FIT, at most 2 longer splits, merged in the split kernel
            mp.setattr(kernels, "FUSED_MERGE_FIT", True)
            launched = []
            mp.setattr(kernels, "_merge_kernel", _Refuse(launched))
            fit = check(q, k, v, idx, lens_t, chunk)
            assert not launched, "the fitted plan must not launch the merge kernel"
            torch.testing.assert_close(fit.float(), two.float(), atol=1e-2, rtol=0)
    assert (kernels._tickets(1, torch.device("cpu")) == 0).all()


@pytest.mark.parametrize("G,group", [(8, 2), (4, 3), (1, 4)])
def test_two_level_merge_matches_two_kernel_path(monkeypatch, G, group):
    """MERGE_GROUP_SPLITS: where one level would exceed the fused merge's limit, the last
    program of each group of splits merges the group and the last group's merger merges the
    groups. Repeated calls with other shapes and split counts (a ragged last group, empty
    splits, rows without tokens): the two-kernel path's output, every ticket zero afterwards,
    and no merge launch."""
    monkeypatch.setattr(kernels, "MERGE_GROUP_SPLITS", group)
    gen = torch.Generator().manual_seed(300 + G * 10 + group)
    cases = [  # B, Hkv, L, lens, K (blocks), chunk
        (3, 2, 4097, [4097, 1, 129], 12, 64),
        (2, 2, 300, [127, 300], 9, 16),
        (1, 1, 4500, [4480], 70, 64),
    ]
    merged = 0
    for B, Hkv, L, lens, K, chunk in cases:
        D = 16
        splits = kernels._plan(B, Hkv, K, chunk, D)[2]
        if splits <= group:  # one group: one level
            assert kernels._two_level_group(G, D, splits) is None
            continue
        merged += 1
        q = torch.randn(B, Hkv * G, D, generator=gen).half()
        k = torch.randn(B, Hkv, L, D, generator=gen).half()
        v = torch.randn(B, Hkv, L, D, generator=gen).half()
        lens_t = torch.tensor(lens)
        idx = random_selection(B, Hkv, -(-L // chunk), K, gen, drop=0.2)
        with _two_kernel(monkeypatch):
            two = check(q, k, v, idx, lens_t, chunk)
        # one level would not fit, two do: groups of `group` splits, then the groups
        monkeypatch.setattr(kernels, "FUSED_MERGE_MAX_BYTES", G * D * 4 * max(group, -(-splits // group)))
        assert kernels._two_level_group(G, D, splits) == group
        launched = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "_merge_kernel", _Refuse(launched))
            got = check(q, k, v, idx, lens_t, chunk)
        assert not launched, "the two-level merge must not launch the merge kernel"
        torch.testing.assert_close(got.float(), two.float(), atol=1e-2, rtol=0)
        monkeypatch.setattr(kernels, "FUSED_MERGE_MAX_BYTES", 64 << 10)
    assert merged >= 2
    assert (kernels._tickets(1, torch.device("cpu")) == 0).all()
    assert not any(t.any() for t in kernels._GROUP_TICKETS._bufs.values())


@pytest.mark.gpu
@pytest.mark.parametrize("B,K", [(1, 16), (1, 103), (2, 16)])
def test_gpu_two_level_merge(monkeypatch, B, K):
    """The two-level fused merge on the GPU at Qwen3-32B's heads (G = 8, D = 128, 128K cache):
    8 calls in a row on new selections, each within the rule and equal to the two-kernel path up
    to rounding (a ticket left set would show as NaN from the poisoned output)."""
    monkeypatch.setattr(kernels, "MERGE_GROUP_SPLITS", 8)
    gen = torch.Generator().manual_seed(500 + B + K)
    Hkv, G, D, L, chunk = 8, 8, 128, 131072, 128
    q = torch.randn(B, Hkv * G, D, generator=gen).bfloat16().cuda()
    k = torch.randn(B, Hkv, L, D, generator=gen).bfloat16().cuda()
    v = torch.randn(B, Hkv, L, D, generator=gen).bfloat16().cuda()
    lens = torch.tensor([L, 70001][:B], device="cuda")
    splits = kernels._plan(B, Hkv, K, chunk, D)[2]
    assert kernels._two_level_group(G, D, splits) == 8 or G * splits * D * 4 <= kernels.FUSED_MERGE_MAX_BYTES
    for _ in range(8):
        idx = random_selection(B, Hkv, L // chunk, K, gen, drop=0.1).cuda()
        got = check(q, k, v, idx, lens, chunk)
        with _two_kernel(monkeypatch):
            two = check(q, k, v, idx, lens, chunk)
        torch.testing.assert_close(got.float(), two.float(), atol=2e-2, rtol=0)


GPU_CASES = [(G, 128, torch.bfloat16) for G in (1, 2, 4, 8, 16)] + [
    (4, 128, torch.float16), (8, 64, torch.bfloat16), (2, 256, torch.bfloat16), (16, 64, torch.float16)
]


@pytest.mark.gpu
@pytest.mark.parametrize("G,D,dtype", GPU_CASES)
def test_gpu_real_shapes(G, D, dtype):
    gen = torch.Generator().manual_seed(G * D)
    B, Hkv, L, chunk = 4, 8 if G <= 8 else 4, 4097, 128
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype).cuda()
    k = torch.randn(B, Hkv, L, D, generator=gen).to(dtype).cuda()
    v = torch.randn(B, Hkv, L, D, generator=gen).to(dtype).cuda()
    lens = torch.tensor([4097, 1, 127, 2049]).cuda()
    idx = random_selection(B, Hkv, 33, 12, gen, drop=0.2)
    idx[1, :, 0] = 0
    check(q, k, v, idx.cuda(), lens, chunk, atol=1e-4)


@pytest.mark.gpu
def test_gpu_fp32_and_token_level():
    gen = torch.Generator().manual_seed(1)
    B, Hkv, G, D, L = 2, 8, 4, 128, 4097
    q = torch.randn(B, Hkv * G, D, generator=gen).cuda()
    k = torch.randn(B, Hkv, L, D, generator=gen).cuda()
    v = torch.randn(B, Hkv, L, D, generator=gen).cuda()
    lens = torch.tensor([4097, 3000]).cuda()
    check(q, k, v, random_selection(B, Hkv, 33, 20, gen).cuda(), lens, 128)
    check(q, k, v, random_selection(B, Hkv, L, 700, gen).cuda(), lens, 1)


def paged_from_contiguous(k, v, page, gen):
    """Scatter [B, Hkv, L, D] K and V into shuffled page pools [B * L / page + 3, Hkv, page, D]
    (unused pages are NaN) and return them with the block table [B, L / page]."""
    B, Hkv, L, D = k.shape
    n = L // page
    perm = torch.randperm(B * n + 3, generator=gen)[: B * n]
    pools = []
    for x in (k, v):
        pool = torch.full((B * n + 3, Hkv, page, D), float("nan"), dtype=x.dtype)
        pool[perm] = x.view(B, Hkv, n, page, D).permute(0, 2, 1, 3, 4).reshape(B * n, Hkv, page, D)
        pools.append(pool)
    return pools[0], pools[1], perm.view(B, n).to(torch.int32)


@pytest.mark.parametrize("page", [16, 32])
def test_paged_block_table(page):
    gen = torch.Generator().manual_seed(page)
    B, Hkv, G, D, L, chunk = 2, 2, 4, 32, 256, 32
    q = torch.randn(B, Hkv * G, D, generator=gen).half()
    k = torch.randn(B, Hkv, L, D, generator=gen).half()
    v = torch.randn(B, Hkv, L, D, generator=gen).half()
    lens = torch.tensor([256, 129])
    idx = random_selection(B, Hkv, L // chunk, 5, gen, drop=0.2)
    want = check(q, k, v, idx, lens, chunk)  # contiguous kernel, against fp64
    kp, vp, table = paged_from_contiguous(k, v, page, gen)
    got = sparse_decode_attention(q, kp, vp, idx, lens, chunk_size=chunk, block_table=table,
                                  backend="triton")
    ref = sparse_decode_attention(q, kp, vp, idx, lens, chunk_size=chunk, block_table=table,
                                  backend="reference")
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # same tiles, same order of math
    torch.testing.assert_close(ref, sparse_decode_attention(
        q, k, v, idx, lens, chunk_size=chunk, backend="reference"), atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_paged_block_table():
    gen = torch.Generator().manual_seed(3)
    B, Hkv, G, D, L, chunk, page = 2, 8, 4, 128, 4096, 128, 64
    q = torch.randn(B, Hkv * G, D, generator=gen).bfloat16()
    k = torch.randn(B, Hkv, L, D, generator=gen).bfloat16()
    v = torch.randn(B, Hkv, L, D, generator=gen).bfloat16()
    kp, vp, table = paged_from_contiguous(k, v, page, gen)
    lens = torch.tensor([4096, 2049]).cuda()
    idx = random_selection(B, Hkv, L // chunk, 9, gen, drop=0.1).cuda()
    want = sparse_decode_attention(q.cuda(), k.cuda(), v.cuda(), idx, lens, chunk_size=chunk)
    got = sparse_decode_attention(q.cuda(), kp.cuda(), vp.cuda(), idx, lens, chunk_size=chunk,
                                  block_table=table.cuda())
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4, 32])
def test_gpu_fused_merge_repeated(monkeypatch, B):
    """Real shapes, fused merge against the two-kernel path and fp64, five calls in a row on new
    inputs (tickets reset by each call; B = 1 has ~32 splits per row, B = 32 has 256 rows)."""
    gen = torch.Generator().manual_seed(B)
    Hkv, G, D, L, chunk = 8, 4, 128, 4097, 128
    for rep in range(5):
        q = torch.randn(B, Hkv * G, D, generator=gen).bfloat16().cuda()
        k = torch.randn(B, Hkv, L, D, generator=gen).bfloat16().cuda()
        v = torch.randn(B, Hkv, L, D, generator=gen).bfloat16().cuda()
        lens = torch.randint(1, L + 1, (B,), generator=gen)
        lens[0] = L if rep % 2 == 0 else 129
        idx = random_selection(B, Hkv, 33, 16 - rep, gen, drop=0.1)
        idx[idx == 0] = -1
        idx[:, :, 0] = 0
        fused = check(q, k, v, idx.cuda(), lens.cuda(), chunk, atol=1e-4)
        with _two_kernel(monkeypatch):
            two = check(q, k, v, idx.cuda(), lens.cuda(), chunk, atol=1e-4)
        torch.testing.assert_close(fused.float(), two.float(), atol=2e-2, rtol=0)
    torch.cuda.synchronize()
    assert (kernels._tickets(B * Hkv, q.device) == 0).all()


def check_multi_query(q, k, v, idx, lens, chunk, atol=1e-5):
    """q [B, Hq, T, D]: query t is token lens - T + t and sees the selected tokens before
    lens - T + t + 1; each query against the fp64 reference with flash-attention's rule."""
    T, D = q.shape[2], q.shape[-1]
    scale = 1 / math.sqrt(D)
    out = torch.full_like(q, float("nan"))
    got = sparse_decode_attention(q, k, v, idx, lens, chunk_size=chunk, out=out, backend="triton")
    assert got.data_ptr() == out.data_ptr() and got.shape == q.shape
    for t in range(T):
        lens_t = (lens - (T - 1 - t)).clamp_min(0)
        mask = selected_token_mask(idx.to(k.device), lens_t, k.shape[2], chunk)
        qt = q[:, :, t].contiguous()
        ok, err, base = attention_close(got[:, :, t], attention_ref_fp64(qt, k, v, mask, scale),
                                        attention_ref_lowp(qt, k, v, mask, scale), atol=atol)
        assert ok, f"query {t}: kernel error {err:.3g} > 2 x torch {q.dtype} error {base:.3g} + {atol}"
    ref = sparse_decode_attention(q, k, v, idx, lens, chunk_size=chunk, backend="reference")
    assert ref.shape == q.shape
    return got


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("G,T,dtype", [(1, 4, torch.float32), (4, 2, torch.float16), (2, 3, torch.float32)])
def test_multi_query_causal(monkeypatch, G, T, dtype, fused):
    # (bf16 on the GPU below: the interpreter truncates fp32 -> bf16, which the rule's torch
    # yardstick does not)
    monkeypatch.setattr(kernels, "FUSED_MERGE", fused)
    gen = torch.Generator().manual_seed(G * 10 + T)
    B, Hkv, D, L, chunk = 3, 2, 32, 200, 16
    q = torch.randn(B, Hkv * G, T, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=gen).to(dtype)
    lens = torch.tensor([200, 129, 2])  # the new tokens straddle a block edge in row 1
    nb = -(-L // chunk)
    # distinct blocks per row (the kernel's contract), the new tokens' blocks among them (row 1's
    # new tokens straddle blocks 7 / 8)
    need = [[nb - 1], [7, 8], [0]]
    rows = []
    for bi in range(B):
        for _ in range(Hkv):
            rest = [int(x) for x in torch.randperm(nb, generator=gen) if int(x) not in need[bi]]
            rows.append(torch.tensor(need[bi] + rest[: 6 - len(need[bi])]))
    idx = torch.stack(rows).view(B, Hkv, 6).to(torch.int32)
    got = check_multi_query(q, k, v, idx, lens, chunk)
    # each query differs from the others (the causal limit moves with it)
    assert not torch.equal(got[0, :, 0], got[0, :, -1])


@pytest.mark.gpu
@pytest.mark.parametrize("G,T", [(4, 4), (8, 2)])
def test_gpu_multi_query(G, T):
    gen = torch.Generator().manual_seed(G + T)
    B, Hkv, D, L, chunk = 2, 8, 128, 4097, 128
    q = torch.randn(B, Hkv * G, T, D, generator=gen).to(torch.bfloat16).cuda()
    k = torch.randn(B, Hkv, L, D, generator=gen).to(torch.bfloat16).cuda()
    v = torch.randn(B, Hkv, L, D, generator=gen).to(torch.bfloat16).cuda()
    lens = torch.tensor([4097, 2050]).cuda()
    need = [32, 16]  # each sequence's last block (its new tokens), plus 11 other distinct blocks
    rows = []
    for bi in range(B):
        for _ in range(Hkv):
            rest = [int(x) for x in torch.randperm(33, generator=gen) if int(x) != need[bi]]
            rows.append(torch.tensor([need[bi]] + rest[:11]))
    idx = torch.stack(rows).view(B, Hkv, 12).to(torch.int32)
    check_multi_query(q, k, v, idx.cuda(), lens, chunk, atol=1e-4)
