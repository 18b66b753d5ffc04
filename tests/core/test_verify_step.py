"""Verify steps: a forward of 2 to ``MAX_VERIFY_QUERIES`` new tokens on a kvcomp cache (the draft
of prompt-lookup or assisted generation) attends sparsely, with one selection per kv-head
from its G x T (head, query) rows and attention causal among the new tokens.

What is established:
  * ``encode_query`` of q [B, Hq, T, D] is the 3-D encoding of its (head, query) rows, head-major,
    every aggregation mode;
  * on a tiny llama model, each layer's verify step selects exactly what ``decode_step``'s
    reference selects from the same cache, a reusing layer takes its source's selection, and
    the outputs equal an fp64 attention over the selected tokens with query t limited to the
    tokens up to its own (``lens - T + t``);
  * with every block selected the verify step equals the dense extend; the model's logits too;
  * the dense fallbacks: longer extends, padded steps, new tokens outside the must-selected
    blocks, and ``is_verify_step`` on each;
  * through ``model.generate(prompt_lookup_num_tokens=...)``: every forward after the prefill
    (decode or verify) is a sparse step, and the host-offloaded cache gives the same tokens and
    logits bit for bit as the in-HBM one.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import kvcomp
import kvcomp.attention as kattn
import pytest
import torch
from kvcomp.bench.timing import attention_ref_fp64
from kvcomp.ops._blocks import selected_token_mask
from kvcomp.ops.decode_step import decode_step
from kvcomp.ops.query_codes import encode_query

_spec = importlib.util.spec_from_file_location(
    "_kvcomp_integration_checks_verify", Path(__file__).resolve().parent / "test_integration_llama.py"
)
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)
cache_kw, config_for, prompt, tiny_model, generate = (
    checks.cache_kw, checks.config_for, checks.prompt, checks.tiny_model, checks.generate)

SPARSE = dict(threshold=16, chunk_size=4, ratio=0.25, top_k_index_reuse=[-1, -1, -1, 2])


@pytest.mark.parametrize("mode", ["sum", "majority", "mean"])
def test_encode_query_several_queries_is_the_rows_encoding(mode):
    gen = torch.Generator().manual_seed(3)
    B, Hkv, G, T, D, bits = 2, 3, 2, 3, 16, 64
    q = torch.randn(B, Hkv * G, T, D, generator=gen)
    w = torch.randn(Hkv, D, bits, generator=gen)
    got = encode_query(q, w, mode)
    want = encode_query(q.reshape(B, Hkv * G * T, D), w, mode)
    assert torch.equal(got, want)
    assert got.shape == ((B, Hkv * G * T, bits // 32) if mode == "sum" else (B, Hkv, bits // 32))


@pytest.mark.parametrize("G", [3, 4])
def test_majority_query_codes_are_the_vote_of_the_heads_codes(G):
    """"majority": bit b of a kv-head's code is the majority of its G query heads' bits b
    (ties -> 0), each head hashed with its kv-head's row (hamming_topk's majority_codes of the
    "sum" codes); a head -> kv-head mix-up would change the votes."""
    from kvcomp.ops.hamming_topk import majority_codes

    gen = torch.Generator().manual_seed(G)
    B, Hkv, D, bits = 2, 3, 16, 64
    q = torch.randn(B, Hkv * G, D, generator=gen)
    w = torch.randn(Hkv, D, bits, generator=gen)
    got = encode_query(q, w, "majority")
    assert got.shape == (B, Hkv, bits // 32)
    assert torch.equal(got, majority_codes(encode_query(q, w, "sum"), Hkv))


def record_sparse_steps(monkeypatch):
    """Wrap the attention function's sparse step: per call (layer index, mode, query, output,
    scale, the layer's query hash weights)."""
    calls = []
    real = kattn._sparse_decode

    def spy(query, layer, binding, mode, scaling):
        out = real(query, layer, binding, mode, scaling)
        calls.append((binding.layer_idx, mode, query.detach().clone(), out.detach().clone(), scaling,
                      binding.kv_weight))
        return out

    monkeypatch.setattr(kattn, "_sparse_decode", spy)
    return calls


def prefill_and_verify(model, h, ids, draft):
    ck = cache_kw(model)
    cache = h.new_cache()
    with torch.no_grad():
        model(ids, **{ck: cache}, use_cache=True)
        out = model(draft, **{ck: cache}, use_cache=True)
    return cache, out.logits


@pytest.mark.parametrize("T,prompt_len", [(3, 45), (4, 46), (2, 33), (5, 43)])
@pytest.mark.parametrize("token_score", ["hamming", "centered_norm"])
def test_verify_step_matches_reference(monkeypatch, T, prompt_len, token_score):
    model = tiny_model("llama")
    cfg = config_for(model, token_score=token_score, **SPARSE)
    h = kvcomp.enable(model, cfg, debug=True)
    calls = record_sparse_steps(monkeypatch)
    try:
        cache, _ = prefill_and_verify(model, h, prompt(prompt_len), prompt(T, seed=9))
    finally:
        h.disable()
    assert [(i, m) for i, m, *_ in calls] == [(2, "compute"), (3, "reuse")]
    L = prompt_len + T
    c = cfg.chunk_size
    for i, mode, q, out, scale, kv_weight in calls:
        layer = cache.layers[i]
        assert layer.lens == [L] and q.shape[2] == T and out.shape == (1, T, q.shape[1], q.shape[3])
        idx = layer.last_block_idx
        if mode == "reuse":
            assert torch.equal(idx, cache.layers[2].last_block_idx)
        else:  # the selection of the G x T rows, as decode_step's reference makes it
            _, idx_r = decode_step(
                q, kv_weight, layer.codes_buf[:, :, :L], layer.keys_buf[:, :, :L],
                layer.values_buf[:, :, :L], layer.seq_lens, k_blocks=h.policy.k_blocks(i, L), max_blocks=h.policy.max_k_blocks(i, L),
                chunk_size=c, must_select=tuple(cfg.must_select_blocks),
                k_scale=None if layer.norms_buf is None else layer.norms_buf[:, :, :L],
                backend="reference")
            assert torch.equal(idx, idx_r)
        sel = set(idx[0, 0].tolist()) - {-1}
        nb = -(-L // c)
        assert len(sel) == h.policy.k_blocks(i, L) < nb
        k, v = layer.keys_buf[:, :, :L], layer.values_buf[:, :, :L]
        for t in range(T):  # query t sees the selected tokens up to its own, L - T + t
            mask = selected_token_mask(idx, layer.seq_lens - (T - 1 - t), L, c)
            want = attention_ref_fp64(q[:, :, t], k, v, mask, scale)
            torch.testing.assert_close(out[:, t].double(), want, rtol=1e-5, atol=1e-5)
        # the causal limit matters: the first query must not see the later new tokens
        full = attention_ref_fp64(q[:, :, 0], k, v, selected_token_mask(idx, layer.seq_lens, L, c), scale)
        assert (out[:, 0].double() - full).abs().max() > 1e-4


def test_verify_with_every_block_equals_dense_extend(monkeypatch):
    model = tiny_model("llama")
    ids, draft = prompt(45), prompt(4, seed=9)
    h = kvcomp.enable(model, config_for(model, threshold=10**6, chunk_size=4))
    _, dense = prefill_and_verify(model, h, ids, draft)
    h.disable()
    h = kvcomp.enable(model, config_for(model, threshold=16, chunk_size=4, top_k_budget_tokens=10**6),
                      debug=True)
    calls = record_sparse_steps(monkeypatch)
    cache, got = prefill_and_verify(model, h, ids, draft)
    h.disable()
    assert [(i, m) for i, m, *_ in calls] == [(i, "compute") for i in (2, 3)]
    assert int(cache.layers[2].history[-1][1]) == int(cache.layers[2].history[-1][2])  # all blocks
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


def test_dense_fallbacks(monkeypatch):
    model = tiny_model("llama")
    cfg = config_for(model, **SPARSE)
    h = kvcomp.enable(model, cfg)
    calls = record_sparse_steps(monkeypatch)
    try:
        # longer than MAX_VERIFY_QUERIES: a prompt fed in pieces stays dense
        cache, _ = prefill_and_verify(model, h, prompt(40), prompt(kattn.MAX_VERIFY_QUERIES + 1, seed=9))
        assert calls == [] and cache.layers[2].step_kind == "extend"
        assert not kattn.is_verify_step(cache.layers[2], kattn.MAX_VERIFY_QUERIES + 1, cfg)
        # a padded step (a sequence with fewer real new tokens) stays dense
        ck = cache_kw(model)
        ids = torch.cat([prompt(40), prompt(40, seed=2)])
        c2 = h.new_cache()
        with torch.no_grad():
            model(ids, **{ck: c2}, use_cache=True)
            mask = torch.ones(2, 43, dtype=torch.long)
            mask[1, -1] = 0
            model(prompt(3, seed=9).expand(2, 3), attention_mask=mask, **{ck: c2}, use_cache=True)
        assert calls == [] and c2.layers[2].lens == [43, 42] and not c2.layers[2].step_all_real
        assert not kattn.is_verify_step(c2.layers[2], 3, cfg)
    finally:
        h.disable()
    # must_select (0, -1): new tokens straddling two blocks are not all must-selected
    cfg1 = config_for(model, must_select=(0, -1), **SPARSE)
    h = kvcomp.enable(model, cfg1)
    try:
        cache, _ = prefill_and_verify(model, h, prompt(43), prompt(3, seed=9))  # tokens 43..45
        assert calls == [] and not kattn.is_verify_step(cache.layers[2], 3, cfg1)
        cache, _ = prefill_and_verify(model, h, prompt(44), prompt(3, seed=9))  # 44..46: block 11
        assert [m for _, m, *_ in calls] == ["compute", "reuse"]
        assert kattn.is_verify_step(cache.layers[2], 3, cfg1) and not kattn.is_verify_step(cache.layers[2], 4, cfg1)
    finally:
        h.disable()


def repetitive_prompt():
    ids = prompt(45)
    return torch.cat([ids[:, :15]] * 3, dim=1)


def count_forwards(model):
    lens = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kw: lens.append((kw.get("input_ids") if kw.get("input_ids") is not None
                                           else args[0]).shape[1]), with_kwargs=True)
    return lens, hook


def test_prompt_lookup_generation_verifies_sparsely():
    model = tiny_model("llama")
    rep = repetitive_prompt()
    h = kvcomp.enable(model, config_for(model, **SPARSE), debug=True)
    lens, hook = count_forwards(model)
    try:
        out = generate(model, rep, new=12, prompt_lookup_num_tokens=4)
    finally:
        hook.remove()
    cache = h.last_cache
    h.disable()
    assert out.sequences.shape == (1, 45 + 12)
    steps = lens[1:]  # after the prefill
    assert any(1 < n <= kattn.MAX_VERIFY_QUERIES for n in steps), steps  # drafts were verified
    for i, want in ((2, "compute"), (3, "reuse")):
        modes = [m for m, _, _ in cache.layers[i].history]
        assert modes == [want] * len(steps)  # every forward after the prefill was sparse
        assert all(int(att) < int(avail) for _, att, avail in cache.layers[i].history)


def test_prompt_lookup_offload_equals_hbm():
    model = tiny_model("llama")
    rep = repetitive_prompt()
    cfg = config_for(model, **SPARSE)
    h = kvcomp.enable(model, cfg)
    ref = generate(model, rep, new=12, prompt_lookup_num_tokens=4)
    h.disable()
    h = kvcomp.enable(model, cfg, offload={"cache_blocks": 6})
    got = generate(model, rep, new=12, prompt_lookup_num_tokens=4)
    st = h.stats
    h.disable()
    assert torch.equal(ref.sequences, got.sequences)
    assert len(ref.logits) == len(got.logits)
    assert all(torch.equal(a, b) for a, b in zip(ref.logits, got.logits))
    assert st["layers"][2]["offload"]["block_hits"] > 0
    assert math.isfinite(st["share_read"]) and 0 < st["share_read"] < 1


def test_verify_step_on_the_triton_kernels(monkeypatch):
    """The same verify step with every op on its Triton kernel (the interpreter on CPU): the
    multi-query attention kernel and the selection of G x T rows equal the references."""
    model = tiny_model("llama")
    ids, draft = prompt(45), prompt(3, seed=9)
    cfg = config_for(model, **SPARSE)
    h = kvcomp.enable(model, cfg)
    ref_cache, ref = prefill_and_verify(model, h, ids, draft)
    if not torch.cuda.is_available():
        monkeypatch.setenv("KVCOMP_BACKEND", "triton")
    calls = record_sparse_steps(monkeypatch)
    cache, got = prefill_and_verify(model, h, ids, draft)
    h.disable()
    assert [m for _, m, *_ in calls] == ["compute", "reuse"]
    assert torch.equal(cache.layers[2].step_block_idx, ref_cache.layers[2].step_block_idx)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- kvcomp bench verify
def test_bench_verify_checks_on_the_kernels(device):
    """The bench's verification on CPU shapes with the Triton kernels (interpreter): a correct
    step passes, an output with one query's causal limit dropped fails."""
    from kvcomp.bench.verify import check_queries, check_verify_step
    from kvcomp.ops.hash_encode import hash_encode

    gen = torch.Generator().manual_seed(4)
    B, Hkv, G, T, D, L, chunk = 2, 2, 2, 3, 32, 70, 16
    q, k, v = (torch.randn(*shape, generator=gen).to(device)
               for shape in ((B, Hkv * G, T, D), (B, Hkv, L, D), (B, Hkv, L, D)))
    w = torch.randn(Hkv, D, 64, generator=gen).to(device)
    codes = hash_encode(k, w)
    lens = torch.tensor([70, 37], device=device)
    checks, out, idx = check_verify_step(q, w.repeat_interleave(G, 0), codes, k, v, lens, 3, chunk=chunk,
                                         backend="triton")
    assert checks == {"select": True, "attend": True}
    scale = 1 / math.sqrt(D)
    wrong = out.clone()
    wrong[:, :, 0] = out[:, :, -1]  # query 0 given the last query's (longer) view
    assert not check_queries(wrong, q, k, v, idx, lens, chunk, scale)[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_verify_refuses_without_gpu(capsys):
    from kvcomp.cli import main

    assert main(["bench", "verify", "--lengths", "4096"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.gpu
def test_bench_verify_gpu(tmp_path):
    from kvcomp.cli import main

    out = tmp_path / "v.json"
    assert main(["bench", "verify", "--lengths", "4096", "--batches", "2", "--q-lens", "4",
                 "--reps", "5", "--json", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [r["T"] for r in rows] == [1, 1, 4, 4] and all(r["verified"] for r in rows)


def test_assisted_generation_with_a_draft_model_verifies_sparsely():
    """``generate(assistant_model=draft)``: the draft (its own plain cache) proposes 3 tokens,
    the kvcomp model verifies them in one sparse step of up to 4 tokens."""
    model = tiny_model("llama")
    draft = tiny_model("llama", seed=1)
    draft.generation_config.num_assistant_tokens = 3
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    h = kvcomp.enable(model, config_for(model, **SPARSE), debug=True)
    lens, hook = count_forwards(model)
    try:
        out = generate(model, prompt(45), new=10, assistant_model=draft, output_logits=False)
    finally:
        hook.remove()
    cache = h.last_cache
    h.disable()
    assert out.sequences.shape == (1, 55)
    steps = lens[1:]
    assert any(n > 1 for n in steps) and max(steps) <= 4, steps
    assert [m for m, _, _ in cache.layers[2].history] == ["compute"] * len(steps)
