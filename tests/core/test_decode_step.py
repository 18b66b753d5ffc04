"""``decode_step`` (encode the query, select, attend) with the Triton kernels against the same
step on the references; on the GPU also captured in a CUDA graph and replayed on new inputs."""

import math

import pytest
import torch
from kvcomp.bench.timing import attention_close, attention_ref_fp64, attention_ref_lowp
from kvcomp.ops._blocks import selected_token_mask
from kvcomp.ops.decode_step import decode_step
from kvcomp.ops.hamming_topk import hamming_topk
from kvcomp.ops.hash_encode import hash_encode


def dyadic(*shape, gen):
    """Values k / 8: projections are exact in fp32 whatever the summation order, so the query
    codes of the kernel and of the reference are equal and so must be the selections."""
    return torch.randint(-8, 9, shape, generator=gen).float() / 8


def make_inputs(B, Hkv, G, D, L, bits, dtype, device, gen):
    q = dyadic(B, Hkv * G, D, gen=gen).to(dtype).to(device)
    k = torch.randn(B, Hkv, L, D, generator=gen).to(dtype).to(device)
    v = torch.randn(B, Hkv, L, D, generator=gen).to(dtype).to(device)
    kv_w = dyadic(Hkv, D, bits, gen=gen).to(device)
    q_w = kv_w.repeat_interleave(G, 0)
    k_codes = hash_encode(k, kv_w, backend="reference")
    return q, q_w, k, v, k_codes


def check_step(q, q_w, k, v, k_codes, lens, chunk, **kw):
    out, idx = decode_step(q, q_w, k_codes, k, v, lens, chunk_size=chunk, backend="triton", **kw)
    out_r, idx_r = decode_step(q, q_w, k_codes, k, v, lens, chunk_size=chunk, backend="reference", **kw)
    assert torch.equal(idx, idx_r)
    scale = kw.get("scale") or 1 / math.sqrt(q.shape[-1])
    mask = selected_token_mask(idx_r, lens, k.shape[2], chunk)
    ok, err, base = attention_close(
        out, attention_ref_fp64(q, k, v, mask, scale), attention_ref_lowp(q, k, v, mask, scale),
        atol=1e-4,
    )
    assert ok, (err, base)
    return out, idx


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("mode", ["exact", "majority"])
def test_step_matches_reference(G, mode):
    gen = torch.Generator().manual_seed(G)
    q, q_w, k, v, k_codes = make_inputs(2, 2, G, 32, 129, 64, torch.float16, "cpu", gen)
    lens = torch.tensor([129, 40])
    check_step(q, q_w, k, v, k_codes, lens, 16, k_blocks=3, mode=mode)


@pytest.mark.parametrize("G,T", [(4, 1), (8, 1), (2, 3)])
def test_step_takes_the_kv_heads_weights(G, T):
    """q_weight [Hkv, D, BITS] (query head j hashed with row j // G, what the integration passes)
    gives the step of the weight expanded per query head, on both backends; a q_weight whose
    rows are neither Hq nor Hkv is refused."""
    gen = torch.Generator().manual_seed(10 + G)
    Hkv = 2
    _, q_w, k, v, k_codes = make_inputs(2, Hkv, G, 32, 129, 64, torch.float16, "cpu", gen)
    kv_w = q_w[::G].contiguous()
    q = dyadic(2, Hkv * G, *((T,) if T > 1 else ()), 32, gen=gen).to(torch.float16)
    lens = torch.tensor([129, 70])
    kw = dict(k_blocks=3, chunk_size=16)
    for backend in ("triton", "reference"):
        out_x, idx_x = decode_step(q, q_w, k_codes, k, v, lens, backend=backend, **kw)
        out_g, idx_g = decode_step(q, kv_w, k_codes, k, v, lens, backend=backend, **kw)
        assert torch.equal(idx_g, idx_x) and torch.equal(out_g, out_x)
    with pytest.raises(ValueError, match="q_weight"):
        decode_step(q, q_w[:3], k_codes, k, v, lens, **kw)


def check_several_queries(B, Hkv, G, T, D, L, chunk, lens, k_blocks, dtype, device, seed):
    """q [B, Hq, T, D]: one selection from the G x T query rows of each kv-head (the group sum
    over all of them), then attention causal among the T new tokens."""
    gen = torch.Generator().manual_seed(seed)
    _, q_w, k, v, k_codes = make_inputs(B, Hkv, G, D, L, 64, dtype, device, gen)
    q = dyadic(B, Hkv * G, T, D, gen=gen).to(dtype).to(device)
    lens = torch.tensor(lens, device=device)
    out, idx = decode_step(q, q_w, k_codes, k, v, lens, chunk_size=chunk, k_blocks=k_blocks, backend="triton")
    out_r, idx_r = decode_step(q, q_w, k_codes, k, v, lens, chunk_size=chunk, k_blocks=k_blocks,
                               backend="reference")
    assert out.shape == q.shape and torch.equal(idx, idx_r)
    # the selection is the one of the flattened (head, query) rows as a group of G * T
    codes = hash_encode(q, q_w, backend="reference").reshape(B, Hkv * G * T, -1)
    assert torch.equal(idx_r, hamming_topk(codes, k_codes, lens, k_blocks=k_blocks, chunk_size=chunk,
                                           backend="reference"))
    scale = 1 / math.sqrt(D)
    for t in range(T):  # query t sees the selected tokens before lens - T + t + 1
        mask = selected_token_mask(idx_r, lens - (T - 1 - t), L, chunk)
        qt = q[:, :, t].contiguous()
        ok, err, base = attention_close(out[:, :, t], attention_ref_fp64(qt, k, v, mask, scale),
                                        attention_ref_lowp(qt, k, v, mask, scale), atol=1e-4)
        assert ok, (t, err, base)


def count_prologue_selections(monkeypatch) -> dict:
    """Counts how deferred selections ran: in the attention's prologue ("prologue") or as their
    own launch ("launch")."""
    import importlib

    hk = importlib.import_module("kvcomp.ops.hamming_topk.kernels")
    calls = {"prologue": 0, "launch": 0}
    args0, run0 = hk.DeferredSelect.kernel_args, hk.DeferredSelect.run

    def kernel_args(self):
        calls["prologue"] += 1
        return args0(self)

    def run(self):
        calls["launch"] += 1
        return run0(self)

    monkeypatch.setattr(hk.DeferredSelect, "kernel_args", kernel_args)
    monkeypatch.setattr(hk.DeferredSelect, "run", run)
    return calls


@pytest.mark.parametrize(
    "B,Hkv,G,chunk,lens,k_blocks,must,tile",
    [
        (1, 2, 4, 16, [1000], 9, (0, -2, -1), None),  # one tile of keys a row
        (3, 2, 2, 16, [700, 21, 333], 12, (0, -2, -1), 16),  # ragged; 2 blocks: must entries overlap; tiled
        (2, 3, 4, 24, [500, 257], 6, (0, -1), None),  # chunk 24: blocks cut by split boundaries
        (2, 1, 8, 128, [900, 130], 3, (0,), None),  # chunk above the attention's tile: 2 splits a block
        (2, 2, 4, 16, [300, 64], "tensor", (0, -2, -1), 32),  # per-sequence k_blocks, wider output
    ],
)
def test_selection_in_attention_prologue(monkeypatch, B, Hkv, G, chunk, lens, k_blocks, must, tile):
    """decode_step at few rows leaves hamming_topk's histogram stage 2 to the attention, whose
    programs each select their own share of block_idx: the selection equals the reference and
    the separate launch exactly (every entry: each program writes only its share), the output
    is within the attention rule, and the histogram is left zeroed for the next launch."""
    import importlib

    hk = importlib.import_module("kvcomp.ops.hamming_topk.kernels")
    ak = importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels")
    if tile is not None:  # rows of more keys than a tile: the prologue loops over tiles
        monkeypatch.setattr(hk, "ATTN_SELECT_BLOCK_MAX", tile)
    gen = torch.Generator().manual_seed(B * 100 + chunk)
    L = max(lens)
    q, q_w, k, v, k_codes = make_inputs(B, Hkv, G, 32, L, 64, torch.float32, "cpu", gen)
    lens = torch.tensor(lens)
    kw = dict(k_blocks=k_blocks, must_select=must)
    if k_blocks == "tensor":
        kw.update(k_blocks=torch.tensor([7, 2], dtype=torch.int32), max_blocks=9)
    monkeypatch.setattr(hk, "HIST_STEP4", False)  # bins of 2 scores first, then of 4 (below)
    calls = count_prologue_selections(monkeypatch)
    out, idx = check_step(q, q_w, k, v, k_codes, lens, chunk, **kw)
    assert calls == {"prologue": 1, "launch": 0}, calls
    nbins = triton_next_pow2(2 * G * 64 // 2 + 1)
    assert not hk._HISTS.get(B * Hkv * nbins, torch.device("cpu")).any(), "histogram not zeroed"
    monkeypatch.setattr(ak, "SELECT_IN_PROLOGUE", False)
    out2, idx2 = decode_step(q, q_w, k_codes, k, v, lens, chunk_size=chunk, backend="triton", **kw)
    assert calls == {"prologue": 1, "launch": 1}, calls
    assert torch.equal(idx, idx2) and torch.equal(out, out2)  # the same split plan: the same sums
    if G % 2 == 0:  # bins of 4 scores (HIST_STEP4): the same selection in the prologue
        monkeypatch.setattr(ak, "SELECT_IN_PROLOGUE", True)
        monkeypatch.setattr(hk, "HIST_STEP4", True)
        out4, idx4 = decode_step(q, q_w, k_codes, k, v, lens, chunk_size=chunk, backend="triton", **kw)
        assert calls == {"prologue": 2, "launch": 1}, calls
        assert torch.equal(idx4, idx) and torch.equal(out4, out)
        assert not hk._HISTS.get(B * Hkv * nbins, torch.device("cpu")).any(), "histogram not zeroed"


def test_selection_in_prologue_with_scalar_entries(monkeypatch):
    """The attention's tile entries one step ahead (SCALAR_BLOCKS), after the selection in the
    prologue wrote this program's share of block_idx: the selection of the reference and the
    per-token path's output bit for bit (chunk 128, splits of several 32-token tiles, ragged
    lengths)."""
    import importlib

    ak = importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels")
    monkeypatch.setattr(ak, "TILE_N", 32)
    monkeypatch.setattr(ak, "LONG_TILE_N", None)
    monkeypatch.setattr(ak, "TARGET_PROGRAMS", 8)
    gen = torch.Generator().manual_seed(77)
    q, q_w, k, v, k_codes = make_inputs(2, 2, 4, 32, 1300, 64, torch.float32, "cpu", gen)
    lens = torch.tensor([1300, 700])
    assert ak._plan(2, 2, 5, 128, 32, G=4)[1] > 32  # several tiles a split
    calls = count_prologue_selections(monkeypatch)
    outs = []
    for scalar in (False, True):
        monkeypatch.setattr(ak, "SCALAR_BLOCKS", scalar)
        outs.append(check_step(q, q_w, k, v, k_codes, lens, 128, k_blocks=5, must_select=(0, -1)))
    assert calls == {"prologue": 2, "launch": 0}, calls
    out, idx = outs[1]
    assert torch.equal(idx, outs[0][1]) and torch.equal(out, outs[0][0])


def test_selection_in_prologue_with_fitted_splits(monkeypatch):
    """FUSED_MERGE_FIT: where a row's partials exceed the fused merge's limit, the attention
    plans fewer, longer splits and still runs the deferred selection in its prologue (no
    separate launch): the selection is the reference's, the output within the rule."""
    import importlib

    ak = importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels")
    B, Hkv, G, D, chunk = 2, 2, 8, 32, 16
    gen = torch.Generator().manual_seed(808)
    q, q_w, k, v, k_codes = make_inputs(B, Hkv, G, D, 700, 64, torch.float32, "cpu", gen)
    lens = torch.tensor([700, 333])
    monkeypatch.setattr(ak, "FUSED_MERGE_MAX_BYTES", G * 2 * D * 4)  # 2 splits fit, the plan has 3
    assert ak._plan(B, Hkv, 9, chunk, D)[2] == 3
    monkeypatch.setattr(ak, "FUSED_MERGE_FIT", True)
    calls = count_prologue_selections(monkeypatch)
    check_step(q, q_w, k, v, k_codes, lens, chunk, k_blocks=9, must_select=(0, -1))
    assert calls == {"prologue": 1, "launch": 0}, calls


@pytest.mark.parametrize("G", [4, 8])
def test_selection_in_prologue_with_the_merge_launched(monkeypatch, G):
    """SELECT_IN_PROLOGUE_UNFUSED: where the partials exceed the fused merge's limit, the split
    programs still run the deferred selection and the merge kernel zeroes the histogram. Three
    steps in a row on the same scratch (a histogram left non-zero would change the next
    selection): each equals the reference, the output is within the rule, no separate launch."""
    import importlib

    ak = importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels")
    hk = importlib.import_module("kvcomp.ops.hamming_topk.kernels")
    B, Hkv, D, chunk = 2, 2, 32, 16
    gen = torch.Generator().manual_seed(909 + G)
    monkeypatch.setattr(ak, "FUSED_MERGE_MAX_BYTES", G * 2 * D * 4)  # 2 splits fit, the plan has 3
    assert ak._plan(B, Hkv, 9, chunk, D)[2] == 3
    monkeypatch.setattr(ak, "SELECT_IN_PROLOGUE_UNFUSED", True)
    merges = []
    real_merge = ak._merge_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                merges.append(kw.get("HIST", False))
                return real_merge[grid](*args, **kw)
            return launch

    monkeypatch.setattr(ak, "_merge_kernel", Spy())
    calls = count_prologue_selections(monkeypatch)
    for step in range(3):
        q, q_w, k, v, k_codes = make_inputs(B, Hkv, G, D, 700, 64, torch.float32, "cpu", gen)
        check_step(q, q_w, k, v, k_codes, torch.tensor([700, 333 + step]), chunk, k_blocks=9,
                   must_select=(0, -1))
    assert calls == {"prologue": 3, "launch": 0} and merges == [True] * 3, (calls, merges)
    assert not any(t.any() for t in hk._HISTS._bufs.values()), "histogram not zeroed"


def test_selection_in_prologue_with_the_two_level_merge(monkeypatch):
    """MERGE_GROUP_SPLITS: the two-level fused merge keeps the deferred selection in the
    prologue; the last merger zeroes the histogram after every program read it (three steps in
    a row on the same scratch, each equal to the reference, no separate launch)."""
    import importlib

    ak = importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels")
    hk = importlib.import_module("kvcomp.ops.hamming_topk.kernels")
    B, Hkv, G, D, chunk = 2, 2, 8, 32, 16
    gen = torch.Generator().manual_seed(1001)
    monkeypatch.setattr(ak, "FUSED_MERGE_MAX_BYTES", G * 2 * D * 4)  # 2 splits fit, the plan has 3
    monkeypatch.setattr(ak, "MERGE_GROUP_SPLITS", 2)  # groups of 2 and 1 splits, then 2 groups
    assert ak._plan(B, Hkv, 9, chunk, D)[2] == 3 and ak._two_level_group(G, D, 3) == 2
    calls = count_prologue_selections(monkeypatch)
    for step in range(3):
        q, q_w, k, v, k_codes = make_inputs(B, Hkv, G, D, 700, 64, torch.float32, "cpu", gen)
        check_step(q, q_w, k, v, k_codes, torch.tensor([700, 333 + step]), chunk, k_blocks=9,
                   must_select=(0, -1))
    assert calls == {"prologue": 3, "launch": 0}, calls
    assert not any(t.any() for t in hk._HISTS._bufs.values()), "histogram not zeroed"


def test_deferred_selection_where_the_prologue_cannot_run(monkeypatch):
    """Without the fused merge (no program to zero the histogram after every reader) the
    deferred selection runs as its own launch first: same selection, output within the rule."""
    import importlib

    monkeypatch.setattr(importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels"),
                        "FUSED_MERGE", False)
    gen = torch.Generator().manual_seed(5)
    q, q_w, k, v, k_codes = make_inputs(2, 2, 4, 32, 600, 64, torch.float32, "cpu", gen)
    calls = count_prologue_selections(monkeypatch)
    check_step(q, q_w, k, v, k_codes, torch.tensor([600, 300]), 16, k_blocks=7)
    assert calls == {"prologue": 0, "launch": 1}, calls


@pytest.mark.gpu
@pytest.mark.parametrize("B,chunk,k_blocks", [(1, 16, 128), (2, 16, 40), (1, 128, 16), (2, 32, "tensor"),
                                               (4, 128, 16)])
def test_gpu_selection_in_attention_prologue(monkeypatch, B, chunk, k_blocks):
    """On the GPU, where the programs of a row really run at once: 8 steps in a row at real
    shapes (Qwen3-8B's heads, 32K-token caches, ragged, up to 32 rows), each against the reference selection and
    the separate stage-2 launch (a program reading a share another writes, or the histogram
    cleared too early or not at all, would show as a wrong selection in a later step)."""
    import importlib

    ak = importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels")
    gen = torch.Generator().manual_seed(B + chunk)
    L = 32768
    q, q_w, k, v, k_codes = make_inputs(B, 8, 4, 128, L, 128, torch.bfloat16, "cuda", gen)
    lens = torch.tensor([L, 20001, 777, 30000][:B], device="cuda")
    kw = dict(k_blocks=k_blocks)
    if k_blocks == "tensor":
        kw.update(k_blocks=torch.tensor([300, 5], dtype=torch.int32, device="cuda"), max_blocks=300)
    calls = count_prologue_selections(monkeypatch)
    for step in range(8):
        q = dyadic(*q.shape, gen=gen).to(q)
        out, idx = check_step(q, q_w, k, v, k_codes, lens, chunk, **kw)
        monkeypatch.setattr(ak, "SELECT_IN_PROLOGUE", False)
        out2, idx2 = decode_step(q, q_w, k_codes, k, v, lens, chunk_size=chunk, backend="triton", **kw)
        monkeypatch.setattr(ak, "SELECT_IN_PROLOGUE", True)
        assert torch.equal(idx, idx2) and torch.equal(out, out2), step
    assert calls == {"prologue": 8, "launch": 8}, calls


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("merge", ["launched", "two_level"])
def test_gpu_selection_in_prologue_with_the_merge_launched(monkeypatch, B, merge):
    """Qwen3-32B's heads on the GPU (G = 8: 128 KB of partials a row at 2048 tokens, above the
    fused merge's limit): stage 2 in the prologue with the merge as its own launch
    (SELECT_IN_PROLOGUE_UNFUSED), or with the two-level fused merge (MERGE_GROUP_SPLITS). 8 steps
    in a row, each equal to the separate stage-2 launch (the histogram must be zeroed after every
    reader, the tickets reset)."""
    import importlib

    ak = importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels")
    gen = torch.Generator().manual_seed(40 + B)
    L = 32768
    q, q_w, k, v, k_codes = make_inputs(B, 8, 8, 128, L, 128, torch.bfloat16, "cuda", gen)
    lens = torch.tensor([L, 20001][:B], device="cuda")
    if merge == "two_level":
        monkeypatch.setattr(ak, "MERGE_GROUP_SPLITS", 8)
    else:
        monkeypatch.setattr(ak, "SELECT_IN_PROLOGUE_UNFUSED", True)
    calls = count_prologue_selections(monkeypatch)
    for step in range(8):
        q = dyadic(*q.shape, gen=gen).to(q)
        out, idx = check_step(q, q_w, k, v, k_codes, lens, 128, k_blocks=16)
        monkeypatch.setattr(ak, "SELECT_IN_PROLOGUE", False)
        out2, idx2 = decode_step(q, q_w, k_codes, k, v, lens, chunk_size=128, backend="triton", k_blocks=16)
        monkeypatch.setattr(ak, "SELECT_IN_PROLOGUE", True)
        assert torch.equal(idx, idx2) and torch.equal(out, out2), step
    assert calls == {"prologue": 8, "launch": 8}, calls


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@pytest.mark.parametrize("G,T", [(1, 3), (4, 2)])
def test_step_several_queries_per_sequence(G, T):
    check_several_queries(2, 2, G, T, 32, 129, 16, [129, 40], 4, torch.float32, "cpu", G + 7 * T)


@pytest.mark.gpu
@pytest.mark.parametrize("G,T", [(4, 4), (8, 2), (1, 3)])
def test_gpu_step_several_queries_real_shapes(G, T):
    check_several_queries(3, 8, G, T, 128, 4097, 128, [4097, 5, 2050], 5, torch.bfloat16, "cuda", G + T)


def test_step_tensor_budget_needs_max_blocks():
    gen = torch.Generator().manual_seed(0)
    q, q_w, k, v, k_codes = make_inputs(2, 1, 2, 16, 64, 32, torch.float32, "cpu", gen)
    lens = torch.tensor([64, 17])
    with pytest.raises(ValueError, match="max_blocks"):
        decode_step(q, q_w, k_codes, k, v, lens, k_blocks=torch.tensor([2, 3]), chunk_size=16)
    check_step(q, q_w, k, v, k_codes, lens, 16, k_blocks=torch.tensor([2, 3]), max_blocks=4)


@pytest.mark.gpu
@pytest.mark.parametrize("G", [1, 4, 8])
def test_gpu_step_real_shapes(G):
    gen = torch.Generator().manual_seed(G)
    q, q_w, k, v, k_codes = make_inputs(3, 8, G, 128, 4097, 128, torch.bfloat16, "cuda", gen)
    lens = torch.tensor([4097, 1, 2049], device="cuda")
    check_step(q, q_w, k, v, k_codes, lens, 128, k_blocks=5)


@pytest.mark.gpu
@pytest.mark.parametrize("fused,merge_in_split", [(False, True), (True, True), (False, False)])
def test_gpu_cuda_graph_capture_and_replay(monkeypatch, fused, merge_in_split):
    """Replays of a captured step on new inputs: the histogram rows (zeroed by stage 2) and the
    attention's merge tickets (reset by the merging program) must start each replay at zero."""
    import importlib

    monkeypatch.setattr(importlib.import_module("kvcomp.ops.hamming_topk.kernels"), "FUSED_SELECT", fused)
    monkeypatch.setattr(importlib.import_module("kvcomp.ops.sparse_decode_attention.kernels"),
                        "FUSED_MERGE", merge_in_split)
    gen = torch.Generator().manual_seed(1)
    B, Hkv, G, D, L, chunk = 2, 8, 4, 128, 4097, 128
    q, q_w, k, v, k_codes = make_inputs(B, Hkv, G, D, L, 128, torch.bfloat16, "cuda", gen)
    lens = torch.tensor([4097, 1000], device="cuda")
    kb = torch.tensor([6, 3], device="cuda")
    kw = dict(k_blocks=kb, max_blocks=6, chunk_size=chunk)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_step(q, q_w, k_codes, k, v, lens, **kw)  # warm-up: compile, caches
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out, idx = decode_step(q, q_w, k_codes, k, v, lens, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    for step in range(3):
        # new query, new lengths and budgets, new cache contents: written in place
        q.copy_(dyadic(*q.shape, gen=gen).to(q.dtype))
        lens.copy_(torch.tensor([4097 - 500 * step, 129 + step]))
        kb.copy_(torch.tensor([6 - step, 2 + step]))
        v.add_(0.1)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        out_r, idx_r = decode_step(q, q_w, k_codes, k, v, lens, backend="reference", **kw)
        assert torch.equal(idx, idx_r)
        mask = selected_token_mask(idx_r, lens, L, chunk)
        scale = 1 / math.sqrt(D)
        ok, err, base = attention_close(
            out, attention_ref_fp64(q, k, v, mask, scale), attention_ref_lowp(q, k, v, mask, scale),
            atol=1e-4,
        )
        assert ok, (step, err, base)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_decode_refuses_without_gpu(capsys):
    from kvcomp.cli import main

    assert main(["bench", "decode", "--quick"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_bench_command_without_torch():
    """`kvcomp --help` and `kvcomp bench decode` work in an environment without torch: the
    benchmark says why it cannot run (exit 1) instead of a traceback."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from kvcomp.cli import build_parser, main\n"
        "build_parser()\n"
        "sys.exit(main(['bench', 'decode', '--quick']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "cannot run here" in r.stdout and "torch" in r.stdout


def test_bench_decode_table_rows(monkeypatch):
    """The printed row of a default run (no --variants: those columns read nan), a failed row
    (names its failed checks, no speedup), and the commit recorded with the JSON."""
    import math as _math

    from kvcomp.bench import decode as bench

    keys = ["dense", "encode", "select_exact", "select_before", "select_search", "scan", "topk",
            "select_majority", "attend", "attend_two_kernel", "step", "step_before"]
    row = dict(model="qwen3-8b", L=131072, B=1, budget="2048", verified=True,
               times_us={k: 10.0 + i for i, k in enumerate(keys)}, bw_frac=dict(select=0.5, attend=0.25),
               speedup=7.5, speedup_before=7.0, speedup_fused=_math.nan, speedup_eager=0.4,
               floor_speedup=21.3, target=8.0, checks={})
    line = bench._table_line(row)
    assert len(line.split()) == len(bench.TABLE_HEAD.split())
    assert " 7.50 " in line and "nan" in line and "50%" in line and "25%" in line
    bad = dict(row, verified=False, checks={"step": True, "select_exact": False})
    assert "VERIFICATION FAILED (select_exact)" in bench._table_line(bad)
    monkeypatch.setenv("KVCOMP_COMMIT", "abc1234")
    assert bench._git_commit() == "abc1234"


def test_bench_decode_input_sets_leave_nothing_in_l2():
    """The benchmark rotates over enough input sets that what one kvcomp call reads (the codes
    for the selection, the smallest budget's K/V for the attention), not only the dense K/V, is
    3x L2: 128K at B = 1 reads 16 MB of codes and 8 MB of selected K/V (2048 tokens)."""
    import math as _math

    from kvcomp.bench import decode as bench

    touched = bench.touched_bytes(1, 131072, ["2048", "10%"])
    assert touched == 8 * 2048 * 128 * 2 * 2  # the selected K/V, fewer than the 16 MB of codes
    assert bench.touched_bytes(1, 131072, ["30%"]) == 8 * 131072 * 16  # the codes
    assert bench.touched_bytes(8, 1024, ["2048"]) == 8 * 8 * 1024 * 16  # the budget is every block
    assert _math.ceil(3 * bench.L2_BYTES / touched) == 19
