"""The KV offload tier (``kvcomp.offload``): bookkeeping, copies, write-through, and equality
with the in-HBM mode.

What is established:
  * ``BlockCache``: hand-built selections give the documented hits, misses, slots and LRU
    victims; random selection sequences match a plain-Python LRU model step by step; a
    selection wider than the cache is a clear error;
  * ``fetch_pages`` (reference and Triton) copies exactly the missing pages into their slots
    and leaves every other slot untouched (pool poisoned with NaN);
  * ``OffloadLayer``: every written token reaches the host rows (write-through), a token
    landing in a resident block also updates its pool page, attention equals the in-HBM
    layer's bit for bit, counters add up;
  * a tiny llama model: offload and in-HBM give the same greedy tokens, the same logits bit
    for bit and the same selections at every decode step, with a block cache smaller than the
    working set (blocks are evicted and fetched again), a ragged left-padded batch and a
    layer reusing another's selection;
  * GPU (``-m gpu``): the same with the Triton kernels, pinned host memory read in place and
    the side stream; no host-device synchronisation in a decode step (sync debug mode).
"""

from __future__ import annotations

import functools
import importlib.util
import random
from pathlib import Path

import kvcomp
import pytest
import torch
from kvcomp.cache import KVCompLayer
from kvcomp.hashing import HashWeights
from kvcomp.offload import (
    BlockCache,
    OffloadCache,
    OffloadConfig,
    OffloadLayer,
    fetch_pages,
    offload_totals,
)

_spec = importlib.util.spec_from_file_location(
    "_kvcomp_integration_checks", Path(__file__).resolve().parent / "test_integration_llama.py"
)
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)
cache_kw, config_for, prompt, tiny_model = checks.cache_kw, checks.config_for, checks.prompt, checks.tiny_model

HKV = 2


# ------------------------------------------------------------------------- BlockCache
def lru_model(steps, rows: int, slots: int):
    """Plain-Python LRU with the documented rules -> per step (slots [R][K], miss [R][K]) and
    the final {row: {block: local slot}}."""
    owner = [[-1] * slots for _ in range(rows)]
    last = [[-1] * slots for _ in range(rows)]
    where = [{} for _ in range(rows)]
    out = []
    for t, sel in enumerate(steps, 1):
        s_step, m_step = [], []
        for r in range(rows):
            for blk in sel[r]:
                if blk >= 0 and blk in where[r]:
                    last[r][where[r][blk]] = t
            order = sorted(range(slots), key=lambda j: (last[r][j], j))
            i = 0
            s_row, m_row = [], []
            for blk in sel[r]:
                if blk < 0:
                    s_row.append(-1)
                    m_row.append(False)
                    continue
                miss = blk not in where[r]
                if miss:
                    j = order[i]
                    i += 1
                    if owner[r][j] >= 0:
                        del where[r][owner[r][j]]
                    owner[r][j] = blk
                    where[r][blk] = j
                    last[r][j] = t
                s_row.append(r * slots + where[r][blk])
                m_row.append(miss)
            s_step.append(s_row)
            m_step.append(m_row)
        out.append((s_step, m_step))
    return out, where


BACKENDS = ["reference", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_cache_hand_built_sequence(backend):
    bc = BlockCache(rows=2, slots=3, n_blocks=10, device="cpu")
    assign = functools.partial(bc.assign, backend=backend)
    # step 1: everything misses; free slots in order
    slots, miss = assign(torch.tensor([[0, 1, -1], [2, 5, 7]], dtype=torch.int32))
    assert slots.tolist() == [[0, 1, -1], [3, 4, 5]]
    assert miss.tolist() == [[True, True, False], [True, True, True]]
    # step 2: row 0: 0 hits, 2 takes the free slot 2; row 1: 5, 7 hit, 8 evicts 2 (the LRU)
    slots, miss = assign(torch.tensor([[0, 2, -1], [5, 7, 8]], dtype=torch.int32))
    assert slots.tolist() == [[0, 2, -1], [4, 5, 3]]
    assert miss.tolist() == [[False, True, False], [False, False, True]]
    assert bc.table[1, 2].item() == -1 and bc.table[1, 8].item() == 3
    # step 3: row 0: 1 hits (slot 1); 3 and 4 take slots 0 and 2 (both last used at step 2,
    # lower index first), evicting 0 and 2; row 1 selects nothing
    slots, miss = assign(torch.tensor([[1, 3, 4], [-1, -1, -1]], dtype=torch.int32))
    assert slots.tolist() == [[1, 0, 2], [-1, -1, -1]]
    assert miss.tolist() == [[False, True, True], [False, False, False]]
    assert bc.table[0, :5].tolist() == [-1, 1, -1, 0, 2]
    assert bc.owner[0, :3].tolist() == [3, 1, 4]
    assert int(bc.hits) == 4 and int(bc.misses) == 9
    assert bc.scratch_slot == 6 and bc.num_pool_slots == 7


LRU_SHAPES = [(3, 5, 12, 4), (2, 7, 30, 7), (1, 1, 3, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,slots,nb,K", LRU_SHAPES)
def test_block_cache_matches_python_lru(backend, rows, slots, nb, K):
    check_lru(backend, rows, slots, nb, K, "cpu")


def check_lru(backend, rows, slots, nb, K, device):
    rng = random.Random(rows * 100 + slots)
    steps = []
    for _ in range(40):
        step = []
        for _ in range(rows):
            k = rng.randint(0, K)
            blocks = sorted(rng.sample(range(nb), k))
            step.append(blocks + [-1] * (K - k))
        steps.append(step)
    want, where = lru_model(steps, rows, slots)
    bc = BlockCache(rows, slots, nb, device)
    for sel, (ws, wm) in zip(steps, want):
        s, m = bc.assign(torch.tensor(sel, dtype=torch.int32, device=device), backend=backend)
        assert s.tolist() == ws
        assert m.tolist() == wm
    for r in range(rows):
        expect = [r * slots + where[r][b] if b in where[r] else -1 for b in range(nb)]
        assert bc.table[r, :nb].tolist() == expect
    n_sel = sum(b >= 0 for st in steps for row in st for b in row)
    assert int(bc.hits) + int(bc.misses) == n_sel


def test_block_cache_errors_and_growth():
    bc = BlockCache(2, 3, 4, "cpu")
    with pytest.raises(ValueError, match="cache_blocks"):
        bc.assign(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[R=2, K\]"):
        bc.assign(torch.zeros(3, 2, dtype=torch.int32))
    bc.assign(torch.tensor([[3, -1], [0, 1]], dtype=torch.int32))
    bc.grow(9)
    assert bc.table.shape == (2, 10)
    assert bc.table[0, 3].item() == 0 and bc.table[1, :2].tolist() == [3, 4]
    assert (bc.table[:, 4:] == -1).all()
    bc.clear()
    assert (bc.table == -1).all() and (bc.owner == -1).all()


# ------------------------------------------------------------------------- fetch_pages
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("chunk,D", [(4, 16), (5, 24)])
def test_fetch_pages_copies_only_misses(backend, chunk, D):
    torch.manual_seed(0)
    R, nb = 3, 5
    host_k = torch.randn(R, nb * chunk, D)
    host_v = torch.randn(R, nb * chunk, D)
    S = 11
    pool_k = torch.full((S, 1, chunk, D), float("nan"))
    pool_v = torch.full((S, 1, chunk, D), float("nan"))
    sel = torch.tensor([[0, 3, -1], [4, 1, 2], [2, -1, -1]], dtype=torch.int32)
    slots = torch.tensor([[7, 2, -1], [0, 9, 5], [3, -1, -1]], dtype=torch.int32)
    miss = torch.tensor([[True, False, False], [True, True, False], [True, False, False]])
    fetch_pages(host_k, host_v, pool_k, pool_v, sel, slots, miss, chunk, backend=backend)
    written = set()
    for r in range(R):
        for k in range(3):
            if miss[r, k]:
                s, b = int(slots[r, k]), int(sel[r, k])
                assert torch.equal(pool_k[s, 0], host_k[r, b * chunk : (b + 1) * chunk])
                assert torch.equal(pool_v[s, 0], host_v[r, b * chunk : (b + 1) * chunk])
                written.add(s)
    for s in set(range(S)) - written:
        assert pool_k[s].isnan().all() and pool_v[s].isnan().all()


def test_fetch_pages_errors():
    hk = torch.zeros(2, 8, 16)
    pool = torch.zeros(5, 1, 4, 16)
    sel = torch.zeros(2, 1, dtype=torch.int32)
    miss = torch.zeros(2, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        fetch_pages(hk, hk, pool, pool, sel, sel, miss, 3)
    with pytest.raises(TypeError, match="sel must have dtype"):
        fetch_pages(hk, hk, pool, pool, sel.long(), sel, miss, 4)
    with pytest.raises(ValueError, match=r"must be \[S, 1, 4, 16\]"):
        fetch_pages(hk, hk, torch.zeros(5, 2, 4, 16), torch.zeros(5, 2, 4, 16), sel, sel, miss, 4)


def test_offload_config_validation():
    with pytest.raises(ValueError, match="cache_blocks"):
        OffloadConfig(cache_blocks=0)
    with pytest.raises(ValueError, match="backend"):
        OffloadConfig(backend="cuda")
    with pytest.raises(ValueError, match="unknown OffloadConfig fields"):
        OffloadConfig.coerce({"blocks": 3})
    assert OffloadConfig.coerce(True) == OffloadConfig()
    assert OffloadConfig.coerce(None) is None
    assert OffloadConfig.coerce({"cache_blocks": 7}).cache_blocks == 7


# ------------------------------------------------------------------------- OffloadLayer
def _layer_pair(device, dtype, *, cache_blocks, chunk=4, D=16, bits=64, side_stream=True):
    w = HashWeights.random(1, HKV, D, bits, seed=3).layer(0, device=device, dtype=torch.float32)
    off = OffloadLayer(0, chunk_size=chunk, code_weight=w,
                       offload=OffloadConfig(cache_blocks=cache_blocks, side_stream=side_stream))
    ref = KVCompLayer(0, chunk_size=chunk, code_weight=w)
    return off, ref


def test_offload_layer_write_through_and_attention():
    torch.manual_seed(1)
    B, D, chunk, G = 2, 16, 4, 3
    off, ref = _layer_pair("cpu", torch.float32, cache_blocks=3, chunk=chunk, D=D)
    k0, v0 = torch.randn(B, HKV, 13, D), torch.randn(B, HKV, 13, D)
    for layer in (off, ref):
        layer.update(k0, v0)
    assert off.host_k.shape[2] == off.capacity and off.capacity % chunk == 0
    q = torch.randn(B, HKV * G, D)
    # blocks 0..3 exist (13 tokens); row-specific selections
    bi = torch.tensor([[[0, 2, 3], [1, 3, -1]], [[0, 1, 3], [3, -1, -1]]], dtype=torch.int32)
    q_nc = q.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous inputs
    bi_nc = bi.transpose(0, 1).contiguous().transpose(0, 1)
    out = off.attend_blocks(q_nc, bi_nc, chunk_size=chunk, scale=0.25)
    assert torch.equal(out, ref.attend_blocks(q, bi, chunk_size=chunk, scale=0.25))
    misses_1 = int(off.blocks.misses)
    assert misses_1 == 9 and int(off.blocks.hits) == 0
    # decode tokens 13, 14, 15: rows 13..15 are block 3, resident in every row
    for _ in range(3):
        k1, v1 = torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D)
        for layer in (off, ref):
            layer.update(k1, v1)
        assert torch.equal(off.host_k[:, :, : off.lens[0]], ref.keys_buf[:, :, : ref.lens[0]])
        assert torch.equal(off.host_v[:, :, : off.lens[0]], ref.values_buf[:, :, : ref.lens[0]])
        for r in range(B * HKV):
            s = int(off.blocks.table[r, 3])
            assert s >= 0
            b, h = divmod(r, HKV)
            assert torch.equal(off.pool_k[s, 0], off.host_k[b, h, 12:16])
            assert torch.equal(off.pool_v[s, 0], off.host_v[b, h, 12:16])
    out = off.attend_blocks(q, bi, chunk_size=chunk, scale=0.25)
    assert torch.equal(out, ref.attend_blocks(q, bi, chunk_size=chunk, scale=0.25))
    assert int(off.blocks.misses) == misses_1  # everything was resident (and fresh)
    st = off.stats()["offload"]
    page = 2 * chunk * D * 4
    assert st["block_hits"] == 9 and st["block_misses"] == 9 and st["hit_rate"] == 0.5
    assert st["h2d_bytes"] == 9 * page and st["fetch_steps"] == 2
    assert st["d2h_bytes"] == 2 * (13 + 3) * B * HKV * D * 4
    assert st["hbm_bytes"] == 0  # everything is on the CPU here
    with pytest.raises(ValueError, match="raise cache_blocks to at least 4"):
        off.attend_blocks(q, torch.zeros(B, HKV, 4, dtype=torch.int32), chunk_size=chunk, scale=0.25)


def test_offload_layer_growth_and_reserve():
    torch.manual_seed(2)
    D, chunk = 16, 4
    w = HashWeights.random(1, HKV, D, 32, seed=0).layer(0, dtype=torch.float32)
    off = OffloadLayer(0, chunk_size=chunk, code_weight=w,
                       offload=OffloadConfig(cache_blocks=4, reserve_tokens=30))
    k = torch.randn(1, HKV, 5, D)
    off.update(k, k)
    assert off.capacity == 32  # reserve, rounded up to whole chunks
    big = torch.randn(1, HKV, 40, D)
    off.update(big, big)
    assert off.capacity >= 45 and off.capacity % chunk == 0
    assert off.blocks.n_blocks == off.capacity // chunk
    assert torch.equal(off.host_k[:, :, :45], torch.cat([k, big], 2))
    assert off.codes_buf.shape[2] == off.capacity


# ------------------------------------------------------------------------- tiny llama
LAYERS = 4
SPARSE = dict(threshold=16, chunk_size=4, ratio=0.25, dense_layers=1, top_k_index_reuse=[-1, -1, -1, 2])


def greedy_loop(model, cache, ids, mask, steps):
    """Prefill + ``steps`` greedy decode steps by hand: (logits per step, tokens, per step
    {layer: block_idx} of the layers that selected)."""
    kw = cache_kw(model)
    logits, sels = [], []
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache})
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks = [tok]
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            pos = mask.sum(-1, keepdim=True) - 1
            out = model(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache})
            logits.append(out.logits[:, -1].clone())
            sels.append({i: layer.step_block_idx.clone() for i, layer in enumerate(cache.layers)
                         if layer.step_block_idx is not None and layer.step_block_idx_update == layer.updates})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok)
    return logits, torch.cat(toks, 1), sels


def ragged_batch(lengths, seed=5):
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, L - n :] = prompt(n, seed=seed + b)[0]
        mask[b, L - n :] = 1
    return ids, mask


def check_offload_equals_hbm(model, lengths, steps, cache_blocks, evict=True, threshold=16,
                             token_score="hamming", **offload_kw):
    from kvcomp.config import KVCompConfig

    mc = model.config
    cfg = KVCompConfig.default(mc.model_type, mc.num_hidden_layers, mc.head_dim,
                               **{**SPARSE, "threshold": threshold}, token_score=token_score)
    h = kvcomp.enable(model, cfg)
    try:
        ids, mask = ragged_batch(lengths)
        dev = next(model.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        ref = greedy_loop(model, h.new_cache(offload=None), ids, mask, steps)
        cache = h.new_cache(offload=OffloadConfig(cache_blocks=cache_blocks, **offload_kw))
        got = greedy_loop(model, cache, ids, mask, steps)
    finally:
        h.disable()
    assert isinstance(cache, OffloadCache) and cache.offload_layers == [1, 2, 3]
    assert torch.equal(ref[1], got[1]), "greedy tokens differ"
    for a, b in zip(ref[0], got[0]):
        assert torch.equal(a, b), f"logits differ by {(a - b).abs().max().item()}"
    for step, (sa, sb) in enumerate(zip(ref[2], got[2])):
        dense = max(lengths) + 1 + step < threshold  # the policy's dense steps select nothing
        assert sa.keys() == sb.keys() == (set() if dense else {1, 2})
        for i in sa:
            assert torch.equal(sa[i], sb[i])
    # the block cache was smaller than the working set: blocks were evicted and fetched again
    distinct = {(i, b, h_, blk) for st in got[2] for i, bi in st.items() for b in range(bi.shape[0])
                for h_ in range(bi.shape[1]) for blk in bi[b, h_].tolist() if blk >= 0}
    distinct_reuse = {(b, h_, blk) for (i, b, h_, blk) in distinct if i == 2}
    tot = offload_totals(cache.layer_stats)
    if evict:
        assert tot["block_misses"] > len(distinct) + len(distinct_reuse)
    else:
        assert tot["block_misses"] >= len(distinct) + len(distinct_reuse)
    assert tot["block_hits"] > 0 and 0 < tot["hit_rate"] < 1
    for i in (1, 2, 3):
        layer = cache.layers[i]
        assert isinstance(layer, OffloadLayer)
        assert torch.equal(layer.host_k[:, :, : layer.max_len].to(dev),
                           layer.keys_buf[:, :, : layer.max_len])
    return cache, tot


def test_offload_equals_hbm_tiny_llama():
    model = tiny_model("llama")
    cache, tot = check_offload_equals_hbm(model, (45, 30), steps=14, cache_blocks=5)
    assert tot["layers"] == 3 and tot["h2d_bytes"] == tot["block_misses"] * 2 * 4 * 16 * 4
    stats = cache.stats
    assert stats["layers"][1]["offload"]["fetch_steps"] == 14
    assert stats["offload"]["hit_rate"] == tot["hit_rate"]


def test_offload_equals_hbm_centered_norm():
    """token_score "centered_norm": the mean key, centred codes and norms stay in HBM, the
    selection weights by them, and offload still equals the in-HBM cache bit for bit."""
    model = tiny_model("llama")
    cache, _ = check_offload_equals_hbm(model, (45, 30), steps=8, cache_blocks=5,
                                        token_score="centered_norm")
    assert cache.layers[1].norms_buf is not None and cache.layers[1].key_mu is not None


def test_offload_dense_steps_read_host_then_sparse():
    """Below the threshold the offloaded layers attend densely over the host rows; the same
    cache then turns sparse (the pool starts empty at the first sparse step)."""
    model = tiny_model("llama")
    cache, tot = check_offload_equals_hbm(model, (20, 14), steps=10, cache_blocks=6, evict=False,
                                          threshold=24)
    assert cache.layers[1].stat.steps["dense"] == 3 and cache.layers[1].stat.fetch_steps == 7


def test_offload_equals_hbm_tiny_llama_triton(monkeypatch):
    """The same with every op on its Triton kernel (the interpreter on CPU): the paged
    attention over the pool and the fetch kernel against the contiguous in-HBM kernels."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("KVCOMP_BACKEND", "triton")
    model = tiny_model("llama")
    check_offload_equals_hbm(model, (33, 26), steps=3, cache_blocks=4, evict=False, backend="triton")


def test_offload_through_generate_and_enable():
    generate = checks.generate
    model = tiny_model("llama")
    cfg = config_for(model, **SPARSE)
    ids = prompt(40)
    h = kvcomp.enable(model, cfg)
    ref = generate(model, ids, new=8)
    h.disable()
    h = kvcomp.enable(model, cfg, offload={"cache_blocks": 6})
    out = generate(model, ids, new=8)
    cache = h.last_cache
    st = h.stats
    h.disable()
    assert isinstance(cache, OffloadCache)
    assert torch.equal(ref.sequences, out.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, out.logits))
    assert st["layers"][2]["offload"]["block_hits"] > 0
    with pytest.raises(ValueError, match="cannot be combined"):
        kvcomp.enable(model, cfg).new_cache(offload=True, static=True, max_cache_len=64)
    model._kvcomp_handle.disable()


def test_offload_cache_too_small_is_a_clear_error():
    model = tiny_model("llama")
    cfg = config_for(model, **SPARSE)
    h = kvcomp.enable(model, cfg)
    try:
        ids, mask = ragged_batch((45,))
        with pytest.raises(ValueError, match="OffloadConfig.cache_blocks"):
            greedy_loop(model, h.new_cache(offload=OffloadConfig(cache_blocks=2)), ids, mask, 2)
    finally:
        h.disable()


# ------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("side_stream", [True, False])
def test_offload_equals_hbm_gpu(side_stream):
    model = tiny_model("llama", head_dim=32, hidden_size=128, num_attention_heads=4).to("cuda", torch.bfloat16)
    # side stream: the first 4 steps dense over the host rows (threshold 305), then sparse
    # with every block of the short sequence (76 blocks wide); else sparse from the start
    kw = dict(threshold=305, cache_blocks=76) if side_stream else dict(cache_blocks=20)
    cache, tot = check_offload_equals_hbm(model, (300, 171), steps=12, evict=False,
                                          side_stream=side_stream, **kw)
    layer = cache.layers[1]
    assert layer.host_k.is_pinned() and not layer.host_k.is_cuda
    assert layer.keys_buf.is_cuda and layer.keys_buf.data_ptr() == layer.host_k.data_ptr()
    assert (layer._stream is not None) == side_stream
    assert tot["hbm_bytes"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("rows,slots,nb,K", LRU_SHAPES + [(16, 32, 1024, 16), (4, 96, 600, 76)])
def test_block_cache_gpu_matches_python_lru(rows, slots, nb, K):
    check_lru("triton", rows, slots, nb, K, "cuda")


@pytest.mark.gpu
def test_fetch_pages_gpu_reads_pinned_host():
    from kvcomp.offload.host import device_view

    torch.manual_seed(0)
    R, chunk, D, nb, K = 6, 128, 128, 40, 16
    hk = torch.randn(R, nb * chunk, D, dtype=torch.bfloat16).pin_memory()
    hv = torch.randn(R, nb * chunk, D, dtype=torch.bfloat16).pin_memory()
    S = R * K + 1
    pools = [torch.full((S, 1, chunk, D), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    sel = torch.stack([torch.randperm(nb)[:K].sort().values for _ in range(R)]).int().cuda()
    slots = torch.randperm(S - 1)[: R * K].view(R, K).int().cuda()
    miss = torch.rand(R, K, device="cuda") < 0.5
    dk, dv = device_view(hk, "cuda"), device_view(hv, "cuda")
    fetch_pages(dk, dv, pools[0], pools[1], sel, slots, miss, chunk, backend="triton")
    fetch_pages(dk.clone(), dv.clone(), pools[2], pools[3], sel, slots, miss, chunk, backend="reference")
    torch.cuda.synchronize()
    assert torch.equal(pools[0].nan_to_num(7.0), pools[2].nan_to_num(7.0))
    assert torch.equal(pools[1].nan_to_num(7.0), pools[3].nan_to_num(7.0))
    assert int(miss.sum()) * chunk * D == int((~pools[0].isnan()).sum())


@pytest.mark.gpu
def test_offload_decode_step_has_no_host_sync():
    torch.manual_seed(0)
    B, D, chunk, G = 2, 128, 128, 4
    off, _ = _layer_pair("cuda", torch.bfloat16, cache_blocks=8, chunk=chunk, D=D)
    k = torch.randn(B, HKV, 3000, D, device="cuda", dtype=torch.bfloat16)
    off.update(k, k)
    q = torch.randn(B, HKV * G, D, device="cuda", dtype=torch.bfloat16)
    nb = -(-3000 // chunk)

    def selection():
        return torch.stack([torch.randperm(nb, device="cuda")[:6].sort().values
                            for _ in range(B * HKV)]).view(B, HKV, 6).int()

    one = torch.randn(B, HKV, 1, D, device="cuda", dtype=torch.bfloat16)
    off.update(one, one)  # grows the host capacity (a documented synchronisation)
    off.attend_blocks(q, selection(), chunk_size=chunk, scale=0.1)
    sels = [selection() for _ in range(4)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for bi in sels:
            off.update(one, one)
            off.attend_blocks(q, bi, chunk_size=chunk, scale=0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(off.blocks.misses) > 0


# ------------------------------------------------------------------------- bench (CPU smoke)
def test_bench_offload_cpu_smoke(tmp_path):
    import argparse
    import json

    from kvcomp.bench import offload as bench

    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "offload.json"
    args = p.parse_args(["--device", "cpu", "--tiny", "--layers", "3", "--lengths", "2304",
                         "--batches", "2", "--steps", "2", "--warmup", "1", "--cache-blocks", "16",
                         "--json", str(out)])
    assert bench.run(args) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["verified"] and row["same_selections"] and row["logits_max_diff"] == 0.0
    assert row["offload_tok_s"] > 0 and row["inhbm_tok_s"] > 0 and row["dense_tok_s"] > 0
    assert 0 < row["hit_rate"] < 1 and row["h2d_bytes_per_step"] > 0
    assert bench.run(p.parse_args(["--device", "cpu", "--tiny", "--lengths", "1000"])) == 2


def test_offload_layer_reset_and_beam_reorder():
    torch.manual_seed(4)
    B, D, chunk = 3, 16, 4
    off, ref = _layer_pair("cpu", torch.float32, cache_blocks=4, chunk=chunk, D=D)
    k, v = torch.randn(B, HKV, 14, D), torch.randn(B, HKV, 14, D)
    for layer in (off, ref):
        layer.update(k, v)
    q = torch.randn(B, HKV * 2, D)
    bi = torch.tensor([[0, 2, 3]], dtype=torch.int32).expand(B, HKV, 3).contiguous()
    off.attend_blocks(q, bi, chunk_size=chunk, scale=0.3)
    beams = torch.tensor([2, 2, 0])
    for layer in (off, ref):
        layer.reorder_cache(beams)
    assert torch.equal(off.host_k[:, :, :14], k[beams]) and off.lens == ref.lens
    assert (off.blocks.table == -1).all()  # the pool starts empty again after a reorder
    one = torch.randn(B, HKV, 1, D)
    for layer in (off, ref):
        layer.update(one, one)
    out = off.attend_blocks(q, bi, chunk_size=chunk, scale=0.3)
    assert torch.equal(out, ref.attend_blocks(q, bi, chunk_size=chunk, scale=0.3))
    assert off.stats()["offload"]["block_misses"] == 2 * B * HKV * 3  # counters carried over
    off.reset()
    assert off.host_k is None and off.blocks is None and off.stats()["offload"]["block_hits"] == 0
    off.update(k[:1], v[:1])
    assert off.batch_size == 1 and off.stats()["offload"]["block_misses"] == 0


def test_host_view_interface_and_cpu_identity():
    from kvcomp.offload.host import _CudaArray, device_view

    t = torch.zeros(2, 3, 8, 4, dtype=torch.bfloat16)[:, 1:]
    cai = _CudaArray(t).__cuda_array_interface__
    assert cai["shape"] == (2, 2, 8, 4) and cai["typestr"] == "<i2" and cai["version"] == 3
    assert cai["strides"] == (3 * 8 * 4 * 2, 8 * 4 * 2, 4 * 2, 2)
    assert cai["data"] == (t.data_ptr(), False)
    assert device_view(t, "cpu") is t


def test_offload_layer_centered_norm_matches_hbm():
    """token_score "centered_norm" state (mean key, norms) lives in HBM beside the codes: the
    offloaded layer keeps the same codes and norms as the in-HBM layer through growth."""
    torch.manual_seed(6)
    D, chunk = 16, 4
    w = HashWeights.random(1, HKV, D, 64, seed=2).layer(0, dtype=torch.float32)
    off = OffloadLayer(0, chunk_size=chunk, code_weight=w, centered_norm=True,
                       offload=OffloadConfig(cache_blocks=4))
    ref = KVCompLayer(0, chunk_size=chunk, code_weight=w, centered_norm=True)
    k = torch.randn(2, HKV, 9, D)
    for layer in (off, ref):
        layer.update(k, k * 0.5)
    for _ in range(12):  # grows past the first capacity
        one = torch.randn(2, HKV, 1, D)
        for layer in (off, ref):
            layer.update(one, one)
    n = off.lens[0]
    assert torch.equal(off.codes_buf[:, :, :n], ref.codes_buf[:, :, :n])
    assert torch.equal(off.norms_buf[:, :, :n], ref.norms_buf[:, :, :n])
    assert torch.equal(off.host_k[:, :, :n], ref.keys_buf[:, :, :n])
    q = torch.randn(2, HKV * 2, D)
    bi = torch.tensor([[0, 3, 5], [1, 4, 5]], dtype=torch.int32).expand(2, HKV, 3).contiguous()
    assert torch.equal(off.attend_blocks(q, bi, chunk_size=chunk, scale=0.3),
                       ref.attend_blocks(q, bi, chunk_size=chunk, scale=0.3))
