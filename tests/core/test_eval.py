"""The accuracy harness: batched decode selection == hamming_topk, the window pass == real
step-by-step decoding (through the ops, and through kvcomp.enable's cache), fidelity and NLL
bookkeeping, synthetic tasks, report and CLI. Tiny random llama models built here, fp32."""

from __future__ import annotations

import json
import math

import pytest
import torch
from kvcomp.eval import selection as sel
from kvcomp.eval.fidelity import FidelityProbe, HashMethod
from kvcomp.eval.nll import evaluate_nll, summarize_nll, token_nll
from kvcomp.eval.window import SparseSpec, prefill, window_logits
from kvcomp.hashing import HashWeights
from kvcomp.ops import hamming_topk, hash_encode, sparse_decode_attention
from kvcomp.ops.query_codes import encode_query, lse_query_scale

transformers = pytest.importorskip("transformers")


def tiny_llama(layers=3, hq=6, hkv=3, head_dim=16, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=hq * head_dim, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=hq, num_key_value_heads=hkv,
                      head_dim=head_dim, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------- selection
@pytest.mark.parametrize("mode", ["sum", "majority", "mean"])
@pytest.mark.parametrize("chunk,L,repre", [(1, 63, "max"), (3, 129, "mean"), (16, 1000, "max"), (16, 127, "mean"),
                                           (16, 1000, "lse"), (5, 129, "lse")])
def test_batched_selection_equals_hamming_topk(mode, chunk, L, repre):
    """Each row of the batched selection is exactly hamming_topk's selection for that step."""
    g = torch.Generator().manual_seed(L * 7 + chunk)
    Hq, Hkv, D, bits = 6, 3, 16, 64
    w = torch.randn(Hkv, D, bits, generator=g)
    k = torch.randn(Hkv, L, D, generator=g)
    positions = torch.tensor([0, 1, chunk, L // 3, L // 2 + 1, L - 2, L - 1])
    q = torch.randn(positions.numel(), Hq, D, generator=g)
    k_codes = hash_encode(k.unsqueeze(0), w)[0]
    seq_lens = positions + 1
    for ratio in (0.05, 0.2, 1.0):
        got = sel.hash_select(q, k_codes, w, seq_lens, ratio, chunk_size=chunk,
                              must_select=(0, -2, -1), chunk_repre=repre, query_mode=mode)
        qc = encode_query(q, w, mode)
        for i, t in enumerate(positions.tolist()):
            n = -(-(t + 1) // chunk)
            kb = math.ceil(ratio * n)
            qs = lse_query_scale(q[i : i + 1], Hkv) if repre == "lse" else None
            want = hamming_topk(qc[i : i + 1], k_codes.unsqueeze(0), torch.tensor([t + 1]),
                                k_blocks=kb, chunk_size=chunk, must_select=(0, -2, -1),
                                chunk_repre=repre, max_blocks=got.shape[-1], q_scale=qs)
            assert torch.equal(got[i : i + 1], want), (ratio, t)


def test_code_token_scores_match_op_scores():
    from kvcomp.ops.hamming_topk.reference import token_scores_ref

    g = torch.Generator().manual_seed(3)
    q_codes = torch.randint(-(2**31), 2**31 - 1, (5, 8, 4), generator=g, dtype=torch.int64).to(torch.int32)
    k_codes = torch.randint(-(2**31), 2**31 - 1, (2, 77, 4), generator=g, dtype=torch.int64).to(torch.int32)
    got = sel.code_token_scores(q_codes, k_codes)
    want = token_scores_ref(q_codes, k_codes.unsqueeze(0).expand(5, -1, -1, -1))
    assert torch.equal(got, want)


def test_oracle_selection_picks_heaviest_blocks_and_must_select():
    mass = torch.tensor([[[0.1, 0.5, 0.05, 0.3, 0.02, 0.03]]])  # 1 row, 1 kv-head, 6 blocks
    got = sel.select_from_block_scores(mass, torch.tensor([24]), 0.5, chunk_size=4, must_select=(0, -1))
    assert got.tolist() == [[[0, 1, 5]]]  # k = ceil(0.5 * 6) = 3: must (0, 5) + the heaviest other (1)
    got = sel.select_from_block_scores(mass, torch.tensor([24]), 0.6, chunk_size=4, must_select=(0, -1))
    assert got.tolist() == [[[0, 1, 3, 5]]]  # k = 4: then block 3 (0.3)
    # a shorter sequence ignores blocks past its end
    got = sel.select_from_block_scores(mass, torch.tensor([9]), 1.0, chunk_size=4, must_select=(0, -1))
    assert got[0, 0][got[0, 0] >= 0].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- window pass
def test_dense_window_equals_model_forward():
    m = tiny_llama()
    ids = torch.randint(0, 97, (150,))
    with torch.no_grad():
        full = m(ids.view(1, -1)).logits[0]
    cache = prefill(m, ids[:100])
    logits, _ = window_logits(m, cache, ids[100:], SparseSpec(method="dense"))
    torch.testing.assert_close(logits, full[100:], rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == 100  # cropped back
    # every block selected == dense, for hash and oracle
    hw = HashWeights.random(3, 3, 16, 64, seed=1)
    for spec in (SparseSpec(method="hash", ratio=1.0, weights=hw, chunk_size=8, dense_layers=()),
                 SparseSpec(method="oracle", ratio=1.0, chunk_size=8, dense_layers=())):
        lg, stats = window_logits(m, cache, ids[100:], spec)
        torch.testing.assert_close(lg, full[100:], rtol=1e-4, atol=1e-4)
        assert stats["attended"] == stats["available"] > 0


def _decode_reference(m, ids, prefix, hw, ratio, chunk, mode, dense_layers):
    """Step-by-step decoding with the public ops, independent of kvcomp.eval: a DynamicCache,
    and for each single-token step an attention function that hashes the whole key cache,
    encodes the query, selects with hamming_topk and attends with sparse_decode_attention."""
    from transformers import AttentionInterface, DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attn(module, query, key, value, attention_mask, scaling=None, **kw):
        if query.shape[2] != 1 or module.layer_idx in dense_layers:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)
        w = hw.layer(module.layer_idx)
        L = key.shape[2]
        k_codes = hash_encode(key.float(), w)  # [1, Hkv, L, W]
        q_codes = encode_query(query[:, :, 0].float(), w, mode)
        n = -(-L // chunk)
        bi = hamming_topk(q_codes, k_codes, torch.tensor([L]), k_blocks=math.ceil(ratio * n),
                          chunk_size=chunk)
        o = sparse_decode_attention(query[:, :, 0].float(), key.float().contiguous(),
                                    value.float().contiguous(), bi, torch.tensor([L]),
                                    chunk_size=chunk, scale=scaling)
        return o.unsqueeze(1).to(query.dtype), None

    AttentionInterface.register("kvcomp_test_decode", attn)
    prev = m.config._attn_implementation
    cache = DynamicCache(config=m.config)
    out = []
    with torch.no_grad():
        m(ids[:prefix].view(1, -1), past_key_values=cache, use_cache=True)
        m.set_attn_implementation("kvcomp_test_decode")
        try:
            for t in range(prefix, ids.numel()):
                out.append(m(ids[t : t + 1].view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1])
        finally:
            m.set_attn_implementation(prev)
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["sum", "majority"])
def test_sparse_window_equals_step_by_step_decoding(mode):
    m = tiny_llama(seed=1)
    ids = torch.randint(0, 97, (210,))
    hw = HashWeights.random(3, 3, 16, 64, seed=2)
    prefix, chunk, ratio = 130, 8, 0.25
    want = _decode_reference(m, ids, prefix, hw, ratio, chunk, mode, dense_layers={0})
    cache = prefill(m, ids[:prefix])
    spec = SparseSpec(method="hash", ratio=ratio, weights=hw, chunk_size=chunk, query_mode=mode,
                      dense_layers={0})
    got, stats = window_logits(m, cache, ids[prefix:], spec, pos_chunk=32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert stats["attended"] < stats["available"]
    dense, _ = window_logits(m, cache, ids[prefix:], SparseSpec(method="dense"))
    assert (dense - got).abs().max() > 1e-3  # the selection really changed something


@pytest.mark.parametrize("token_score", ["hamming", "centered_norm"])
def test_sparse_window_equals_kvcomp_enable_decoding(token_score):
    """The window pass agrees with true decoding through kvcomp's own cache and attention
    (centered_norm: the same prefill mean, centred codes and key norms on both sides)."""
    import kvcomp
    from kvcomp.config import KVCompConfig

    m = tiny_llama(seed=4)
    ids = torch.randint(0, 97, (200,))
    hw = HashWeights.random(3, 3, 16, 64, seed=5)
    chunk, ratio, prefix = 8, 0.3, 120
    cfg = KVCompConfig.from_dict(dict(
        model_name="tiny", num_hidden_layers=3, head_dim=16, hash_bits=64, chunk_size=chunk,
        top_k_ratio_per_layer=[1.0, ratio, ratio], seq_len_threshhold=0, token_score=token_score))
    handle = kvcomp.enable(m, config=cfg, hash_weights=hw)
    try:
        cache = handle.new_cache()
        steps = []
        with torch.no_grad():
            m(ids[:prefix].view(1, -1), past_key_values=cache, use_cache=True)
            for t in range(prefix, ids.numel()):
                steps.append(m(ids[t : t + 1].view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1])
    finally:
        handle.disable()
    want = torch.stack(steps)
    c2 = prefill(m, ids[:prefix])
    got, _ = window_logits(m, c2, ids[prefix:], SparseSpec(method="hash", ratio=ratio, weights=hw,
                                                            chunk_size=chunk, dense_layers={0},
                                                            token_score=token_score))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if token_score == "centered_norm":  # and it is not the hamming selection
        c3 = prefill(m, ids[:prefix])
        plain, _ = window_logits(m, c3, ids[prefix:], SparseSpec(method="hash", ratio=ratio, weights=hw,
                                                                 chunk_size=chunk, dense_layers={0}))
        assert (plain - got).abs().max() > 1e-3


# ----------------------------------------------------------------------------- fidelity + nll
def test_fidelity_probe_bounds_and_oracle_dominates():
    m = tiny_llama(seed=2)
    ids = torch.randint(0, 97, (300,))
    hw = HashWeights.random(3, 3, 16, 64, seed=0)
    probe = FidelityProbe([HashMethod("random", hw), HashMethod("random-maj", hw, "majority"),
                           HashMethod("random+cn", hw, "sum", "centered_norm")],
                          ratios=(0.1, 0.3, 1.0), chunk_size=8)
    cache = prefill(m, ids[:200])
    window_logits(m, cache, ids[200:], SparseSpec(method="dense"), probe=probe, pos_chunk=40)
    s = probe.summary(sparse_layers=[1, 2])
    for meth in ("random", "random-maj", "random+cn", "oracle"):
        assert s[meth]["1.0"]["mass"] == pytest.approx(1.0, abs=1e-5)
        assert s[meth]["1.0"]["error"] == pytest.approx(0.0, abs=1e-4)
        assert s[meth]["0.1"]["positions"] == 100
        assert 0.0 < s[meth]["0.1"]["mass"] < s[meth]["0.3"]["mass"] <= 1.0
    # the oracle maximises captured mass per (position, kv-head) for a given block count
    for r in ("0.1", "0.3"):
        o = probe.per_position(probe.mass, "oracle", float(r), [0, 1, 2])
        h = probe.per_position(probe.mass, "random", float(r), [0, 1, 2])
        assert (o >= h - 1e-6).all()
        assert s["oracle"][r]["mass"] > s["random"][r]["mass"]


def test_nll_summary_is_paired_and_dense_spec_is_exact():
    m = tiny_llama(seed=3)
    docs = [torch.randint(0, 97, (90,)), torch.randint(0, 97, (100,))]
    hw = HashWeights.random(3, 3, 16, 64, seed=0)
    specs = [SparseSpec(method="hash", ratio=0.2, weights=hw, chunk_size=4),
             SparseSpec(method="oracle", ratio=1.0, chunk_size=4)]
    res = evaluate_nll(m, docs, specs, window=40, progress=False)
    assert res["positions"] == 80
    with torch.no_grad():
        lg = m(docs[1].view(1, -1)).logits[0, -41:-1]
    torch.testing.assert_close(res["dense"]["nll"][40:], token_nll(lg, docs[1][-40:]), rtol=1e-4, atol=1e-4)
    s = summarize_nll(res)
    assert s["oracle@1"]["nll_diff"] == pytest.approx(0.0, abs=1e-5)
    assert s["oracle@1"]["top1_agreement"] == 1.0
    assert s["hash-sum@0.2"]["attended_share"] < 0.6
    assert s["hash-sum@0.2"]["nll_diff_se"] > 0


def test_window_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        SparseSpec(method="magic")
    with pytest.raises(ValueError, match="weights"):
        SparseSpec(method="hash")
    with pytest.raises(ValueError, match="ratio"):
        SparseSpec(method="oracle", ratio=0.0)


# ----------------------------------------------------------------------------- tasks + report
class _CharTokenizer:
    """A byte-level stand-in tokenizer (the tasks only need encode/decode)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(b, 96) for b in text.encode("ascii", "replace")]}

    def decode(self, ids):
        return bytes(ids).decode("ascii", "replace")


def test_tasks_build_and_score():
    from kvcomp.eval.tasks import TASKS, build_haystacks, score_questions, summarize_tasks

    tok = _CharTokenizer()
    texts = [("a", "The quick brown fox jumps over the lazy dog. " * 40)]
    hs = build_haystacks(texts, tok, n=2, context_tokens=1500, seed=1)
    assert len(hs) == 2
    for h in hs:
        assert {q.task for q in h.questions} == set(TASKS)
        for q in h.questions:
            if q.task in ("single_needle", "multi_key"):
                number = q.answer.strip(" .")
                assert f"is: {number}." in h.text
        mv = [q for q in h.questions if q.task == "multi_value"][0]
        vals = mv.answer.strip(" .").split(", ")
        assert [h.text.index(v) for v in vals] == sorted(h.text.index(v) for v in vals)
    assert hs[0].text != hs[1].text
    m = tiny_llama(seed=5)
    res = score_questions(m, tok, hs[:1], [SparseSpec(method="oracle", ratio=1.0, chunk_size=16)],
                          progress=False)
    assert res["dense"] == res["oracle@1"]  # every block selected == dense
    s = summarize_tasks(res)
    assert s["oracle@1"]["overall"]["diff_vs_dense"] == 0.0
    assert s["dense"]["overall"]["n"] == 6


def test_report_tables_and_plots(tmp_path):
    from kvcomp.eval.report import write_report

    results = {
        "setup": {"model": "tiny", "chunk_size": 16, "bits": 64},
        "fidelity": {"random-sum": {"0.05": {"mass": 0.7, "mass_se": 0.01, "error": 0.3, "error_se": 0.01},
                                    "0.1": {"mass": 0.8, "mass_se": 0.01, "error": 0.2, "error_se": 0.01}},
                     "oracle": {"0.05": {"mass": 0.8, "mass_se": 0.01, "error": 0.2, "error_se": 0.01},
                                "0.1": {"mass": 0.9, "mass_se": 0.01, "error": 0.1, "error_se": 0.01}}},
        "nll": {"positions": 10, "dense": {"ppl": 10.0, "nll": 2.3, "nll_se": 0.1},
                "hash-sum@0.1": {"ppl": 10.5, "ppl_increase": 0.05, "ppl_increase_se": 0.01,
                                 "top1_agreement": 0.9, "top1_agreement_se": 0.01, "nll_diff": 0.05,
                                 "nll_diff_se": 0.01, "attended_share": 0.12},
                "oracle@0.1": {"ppl": 10.2, "ppl_increase": 0.02, "ppl_increase_se": 0.01,
                               "top1_agreement": 0.95, "top1_agreement_se": 0.01, "nll_diff": 0.02,
                               "nll_diff_se": 0.01, "attended_share": 0.12}},
    }
    md = write_report(results, tmp_path)
    text = md.read_text()
    assert "| random-sum |" in text and "0.800" in text and "+5.00%" in text
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["captured_mass.png", "nll_vs_budget.png"]
    assert all((tmp_path / p).stat().st_size > 1000 for p in pngs)
    json.dumps(results)


def test_merge_results_unites_methods_and_checks_positions():
    from kvcomp.eval.report import merge_results

    a = {"setup": {"positions": 10, "hash_weights": None},
         "fidelity": {"random-sum": {"0.1": {"mass": 0.8}}, "oracle": {"0.1": {"mass": 0.9}}},
         "nll": {"positions": 10, "dense": {"ppl": 5.0}, "random-sum@0.1": {"ppl": 5.5}},
         "tasks": {"dense": {}, "oracle@0.2": {}}}
    b = {"setup": {"positions": 10, "hash_weights": "W"},
         "fidelity": {"trained-sum": {"0.1": {"mass": 0.85}}},
         "nll": {"positions": 10, "dense": {"ppl": 5.0}, "trained-sum@0.1": {"ppl": 5.3}},
         "tasks": {"dense": {}, "trained-sum@0.2": {}}}
    m = merge_results(a, b)
    assert set(m["fidelity"]) == {"random-sum", "oracle", "trained-sum"}
    assert set(m["nll"]) == {"positions", "dense", "random-sum@0.1", "trained-sum@0.1"}
    assert set(m["tasks"]) == {"dense", "oracle@0.2", "trained-sum@0.2"}
    assert m["setup"]["hash_weights"] == "W"
    with pytest.raises(ValueError, match="positions"):
        merge_results({**a, "setup": {"positions": 11}}, b)


@pytest.mark.parametrize("value", ["bogus", "", "hamming,hamming", "hamming,centered"])
def test_eval_cli_rejects_bad_token_scores(value, tmp_path, capsys):
    from kvcomp.cli import main

    rc = main(["eval", "--model", "smollm2", "--json", str(tmp_path / "x.json"), "--token-scores", value])
    assert rc == 1
    assert "--token-scores" in capsys.readouterr().err
