"""HATA hash training: capture (post-RoPE, what the cache holds), pair labels, the loss, the
trainer (deterministic, resumable, learns, 2-process torchrun == 1 process), MLA on a tiny
DeepSeek-V3, and the train-hash / eval commands end to end. Tiny models built here, fp32."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kvcomp.hashing import HashWeights
from kvcomp.training import (
    LossWeights,
    TrainConfig,
    capture_qk,
    dense_labels,
    hata_loss,
    train_hash_weights,
)
from kvcomp.training.collect import positives, sample_positions
from kvcomp.training.loss import balance_term, decorrelation_term, similarity_term

transformers = pytest.importorskip("transformers")

FAST = dict(epochs=3, iters_per_epoch=4, n_queries=8, queries_per_iter=12)


def tiny_llama(layers=3, seed=0, vocab=97):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen3(seed=0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    return Qwen3ForCausalLM(cfg).eval()


def tiny_deepseek(seed=0):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(vocab_size=97, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                           first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                           qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                           max_position_embeddings=1024, rope_scaling=None)
    return DeepseekV3ForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------- capture
@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3-qknorm"])
def test_capture_is_post_rope_post_norm_and_equals_cache(make):
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = make()
    ids = torch.randint(0, 97, (77,))
    cap = capture_qk(m, ids)
    assert sorted(cap) == list(range(m.config.num_hidden_layers))
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(ids.view(1, -1), past_key_values=cache, use_cache=True)
    for i in cap:
        assert torch.equal(cache.layers[i].keys[0], cap[i].k)  # exactly what the cache holds
    # queries: recompute layer 1's q by hand (q_proj, optional q_norm, RoPE)
    attn = m.model.layers[1].self_attn
    with torch.no_grad():
        h = m.model.embed_tokens(ids.view(1, -1))
        h = m.model.layers[0](h, position_embeddings=m.model.rotary_emb(h, torch.arange(77).view(1, -1)),
                              attention_mask=None)
        h = h[0] if isinstance(h, tuple) else h
        x = m.model.layers[1].input_layernorm(h)
        q = attn.q_proj(x).view(1, 77, -1, 16).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        cos, sin = m.model.rotary_emb(x, torch.arange(77).view(1, -1))
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    torch.testing.assert_close(cap[1].q, q[0], rtol=1e-4, atol=1e-5)
    assert m.config._attn_implementation != "kvcomp_capture"  # restored


def test_capture_mla_latent_identity():
    """The captured latent pieces reproduce the layer's attention output exactly:
    softmax(scaling * (q_lat . ckv + q_pe . kpe)) @ (ckv @ W_UV^T) -> o_proj."""
    m = tiny_deepseek()
    ids = torch.randint(0, 97, (40,))
    attn = m.model.layers[1].self_attn
    seen = {}
    hook = attn.register_forward_hook(lambda mod, a, out: seen.__setitem__("out", out[0]))
    try:
        cap = capture_qk(m, ids)
    finally:
        hook.remove()
    c = cap[1]
    assert c.ckv.shape == (40, 32) and c.kpe.shape == (40, 8) and c.q_lat.shape == (4, 40, 32)
    logits = torch.einsum("htr,sr->hts", c.q_lat, c.ckv) + torch.einsum("htp,sp->hts", c.q_pe, c.kpe)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    p = torch.softmax((logits * attn.scaling).masked_fill(~causal, float("-inf")), -1)
    w_uv = attn.kv_b_proj.weight.float().view(4, 32, 32)[:, 16:, :]  # [H, v, R]
    v = torch.einsum("sr,hvr->hsv", c.ckv, w_uv)
    o = torch.einsum("hts,hsv->thv", p, v).reshape(40, 64)
    with torch.no_grad():
        want = attn.o_proj(o)
    torch.testing.assert_close(want, seen["out"][0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- labels
def test_positions_and_labels():
    g = torch.Generator().manual_seed(0)
    pos = sample_positions(100, 10, g)
    assert pos.numel() == 10 and (pos >= 50).all() and (pos < 100).all() and torch.equal(pos, pos.sort().values)
    assert sample_positions(9, 50, g).tolist() == [4, 5, 6, 7, 8]  # capped at the second half
    scores = torch.randn(3, 40, generator=g)
    t = torch.tensor([0, 19, 39])
    pidx = positives(scores, t, 0.1)
    S = dense_labels(t, pidx, 40)
    for r, tt in enumerate(t.tolist()):
        n_pos = max(1, math.ceil(0.1 * (tt + 1)))
        order = scores[r, : tt + 1].argsort(descending=True)[:n_pos]
        assert pidx[r, :n_pos].tolist() == order.tolist()
        row = S[r]
        assert (row[tt + 1 :] == 0).all()  # future keys are not pairs
        assert row[order[0]] == 20.0 and (n_pos == 1 or row[order[-1]] == 1.0)
        assert (row[: tt + 1] == -1).sum() == tt + 1 - n_pos
        if n_pos > 2:
            assert (row[order].diff() < 0).all()  # graded 20 -> 1 by rank


# ----------------------------------------------------------------------------- loss
def test_loss_terms():
    W = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0].float()
    assert decorrelation_term(W) == pytest.approx(0.0, abs=1e-5)
    assert decorrelation_term(2 * torch.eye(4)) == pytest.approx(math.sqrt(4 * 9))
    hk = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert balance_term(hk) == 0.0
    assert balance_term(torch.ones(3, 2)) == pytest.approx(2.0)
    hq = torch.tensor([[1.0, 1.0]])
    hk = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [0.0, 0.0]])
    S = torch.tensor([[2.0, -1.0, 0.0]])
    # sum_ij S_ij ||hq_i - hk_j||^2 / #pairs = (2 * 0 - 1 * 4) / 2
    assert similarity_term(hq, hk, S) == pytest.approx(-2.0)
    # the cross term alone: -2 * (2 * (hq . hk0) - 1 * (hq . hk1)) / 2 = -2 * (4 - 0) / 2
    assert similarity_term(hq, hk, S, "inner") == pytest.approx(-4.0)
    with pytest.raises(ValueError, match="distance"):
        similarity_term(hq, hk, S, "cosine")
    q, k = torch.randn(2, 5, 4), torch.randn(2, 9, 4)
    S = torch.randint(-1, 3, (2, 5, 9)).float()
    W = torch.randn(2, 4, 32, requires_grad=True)
    loss, parts = hata_loss(q, k, S, W, LossWeights())
    loss.backward()
    assert set(parts) == {"similarity", "balance", "decorrelation"} and W.grad.abs().sum() > 0
    # projections are independent: the loss of the pair is the sum of each alone
    l0, _ = hata_loss(q[:1], k[:1], S[:1], W[:1].detach())
    l1, _ = hata_loss(q[1:], k[1:], S[1:], W[1:].detach())
    assert float(loss) == pytest.approx(float(l0 + l1), rel=1e-5)


# ----------------------------------------------------------------------------- trainer
def _docs(n=3, T=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (T,), generator=g) for _ in range(n)]


def test_trainer_deterministic_resumable_and_saved(tmp_path):
    m = tiny_llama()
    docs = _docs()
    cfg = TrainConfig(bits=32, **FAST)
    out = tmp_path / "w.safetensors"
    a = train_hash_weights(m, docs, cfg, out=out, progress=False)
    b = train_hash_weights(m, docs, cfg, progress=False)
    assert a.trained and a.kind == "gqa" and a.bits == 32
    for i in range(3):
        assert torch.equal(a.layer(i), b.layer(i))
    rnd = HashWeights.random(3, 2, 16, 32, seed=0)
    assert all((a.layer(i) - rnd.layer(i)).abs().max() > 1e-3 for i in range(3))  # it trained
    loaded = HashWeights.load(out)
    assert loaded.trained and all(torch.equal(loaded.layer(i), a.layer(i)) for i in range(3))
    c = train_hash_weights(m, docs, TrainConfig(bits=32, **{**FAST, "seed": 1}), progress=False)
    assert (c.layer(1) - a.layer(1)).abs().max() > 1e-4  # the seed matters
    # resume: drop one layer's checkpoint, the others are loaded (not retrained)
    ckpt = tmp_path / "w.safetensors.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [f"layer_{i:03d}.safetensors" for i in range(3)]
    (ckpt / "layer_001.safetensors").unlink()
    os.remove(out)
    r = train_hash_weights(m, docs, cfg, out=out, resume=True, progress=False)
    assert r.train_stats["layers_resumed"] == [0, 2] and r.train_stats["layers_trained"] == [1]
    assert all(torch.equal(r.layer(i), a.layer(i)) for i in range(3))
    with pytest.raises(ValueError, match="resume"):
        train_hash_weights(m, docs, cfg, resume=True, progress=False)
    # checkpoints of other settings are refused, never mixed in
    with pytest.raises(ValueError, match="other settings .*center_keys"):
        train_hash_weights(m, docs, TrainConfig(bits=32, center_keys=True, **FAST), out=out,
                           resume=True, progress=False)
    with pytest.raises(ValueError, match="bits"):
        train_hash_weights(m, docs, TrainConfig(bits=33), progress=False)


def _offset_pairs(g, n_docs=4, T=256, D=16, nq=32):
    """Keys with a large common offset (as real LLM keys have): random hyperplanes through the
    origin waste most bits on it, so there is something for training to learn."""
    from kvcomp.training.collect import PairSet

    ps = PairSet()
    for _ in range(n_docs):
        k = torch.randn(T, D, generator=g)
        k[:, 0] += 6
        q = torch.randn(nq, D, generator=g)
        q[:, 0] += 3
        t = torch.randint(T // 2, T, (nq,), generator=g)
        ps.add(q, k, t, positives(q @ k.T, t, 0.1))
    return ps


def _recall(W, ps):
    """Share of each query's true top-10% keys (by q . k) that are in its top-10% by hash score."""
    hits = total = 0
    for d in range(ps.num_docs):
        q, k, t = ps.q[d], ps.k[d], ps.t[d]
        s = torch.sign(q @ W) @ torch.sign(k @ W).T
        for i in range(q.shape[0]):
            n = max(1, int(0.1 * (t[i] + 1)))
            true = set((q[i] @ k[: t[i] + 1].T).topk(n).indices.tolist())
            hashed = set(s[i, : t[i] + 1].topk(n).indices.tolist())
            hits += len(true & hashed)
            total += n
    return hits / total


def test_training_improves_recall_of_top_keys():
    """The paper's recipe (defaults) on held-out pairs: trained hashes find more of the true top
    keys than their random orthogonal init."""
    from kvcomp.training.trainer import train_projections

    g = torch.Generator().manual_seed(0)
    train, held = _offset_pairs(g), _offset_pairs(g)
    W0 = HashWeights.random(1, 1, 16, 32, seed=0).layer(0)
    W, hist = train_projections([train], W0, TrainConfig(bits=32), layer=0)
    assert len(hist) == 15 * 20 and hist[-1]["loss"] < hist[0]["loss"]
    before, after = _recall(W0[0], held), _recall(W[0], held)
    assert after > before + 0.03, (before, after)


def test_center_keys_ignores_a_common_key_offset():
    """center_keys trains on each document's keys minus the mean of its first half: adding one
    vector to every key (which changes no query's key ranking) leaves the trained weights as
    they are, and without centring it does not."""
    from kvcomp.training.collect import PairSet
    from kvcomp.training.trainer import train_projections

    g = torch.Generator().manual_seed(1)
    base = _offset_pairs(g, n_docs=2, T=128)
    shifted = PairSet()
    offset = torch.randn(16, generator=g) * 4
    for d in range(base.num_docs):
        shifted.add(base.q[d], base.k[d] + offset, base.t[d], base.pos_idx[d])
    W0 = HashWeights.random(1, 1, 16, 32, seed=0).layer(0)
    cfg = dict(bits=32, epochs=2, iters_per_epoch=5)
    a, _ = train_projections([base], W0, TrainConfig(center_keys=True, **cfg), layer=0)
    b, _ = train_projections([shifted], W0, TrainConfig(center_keys=True, **cfg), layer=0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    c, _ = train_projections([base], W0, TrainConfig(**cfg), layer=0)
    d, _ = train_projections([shifted], W0, TrainConfig(**cfg), layer=0)
    assert (c - d).abs().max() > 1e-3


def test_train_mla_tiny_deepseek(tmp_path):
    m = tiny_deepseek()
    cfg = TrainConfig(bits_kv=64, bits_rope=32, **FAST)
    out = tmp_path / "mla.safetensors"
    hw = train_hash_weights(m, _docs(2, 96), cfg, out=out, progress=False)
    assert hw.kind == "mla" and hw.trained
    assert hw.latent(0).shape == (1, 32, 64) and hw.rope(1).shape == (1, 8, 32)
    rnd = HashWeights.random_mla(2, 32, 8, bits_kv=64, bits_rope=32, seed=0)
    for i in range(2):
        assert (hw.latent(i) - rnd.latent(i)).abs().max() > 1e-4
        assert (hw.rope(i) - rnd.rope(i)).abs().max() > 1e-4
    loaded = HashWeights.load(out)
    assert torch.equal(loaded.rope(1), hw.rope(1))
    with pytest.raises(ValueError, match="center_keys is for GQA"):
        train_hash_weights(m, _docs(1, 96), TrainConfig(bits_kv=64, bits_rope=32, center_keys=True,
                                                        **FAST), progress=False)


# ----------------------------------------------------------------------------- distributed
_DIST_SCRIPT = textwrap.dedent("""
    import atexit, os, sys, torch
    import torch.distributed as dist
    # runs after kvcomp's own exit handler (atexit is last in, first out): the group must be gone
    atexit.register(lambda: open(f"{sys.argv[1]}.rank{os.environ.get('RANK', 0)}.exit", "w").write(
        str(dist.is_initialized())))
    from transformers import LlamaConfig, LlamaForCausalLM
    from kvcomp.training import TrainConfig, train_hash_weights
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=1024)
    m = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 97, (160,), generator=g) for _ in range(3)]
    train_hash_weights(m, docs, TrainConfig(bits=32, epochs=3, iters_per_epoch=4, n_queries=8,
                       queries_per_iter=12), out=sys.argv[1], progress=False)
""")


def test_two_process_training_matches_one(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    subprocess.run([sys.executable, str(script), str(one)], check=True, env=env, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(script), str(two)],
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each rank destroyed the process group kvcomp created before the interpreter's teardown
    assert [(tmp_path / f"two.safetensors.rank{r}.exit").read_text() for r in (0, 1)] == ["False"] * 2
    a, b = HashWeights.load(one), HashWeights.load(two)
    assert b.trained
    for i in range(3):
        torch.testing.assert_close(a.layer(i), b.layer(i), rtol=1e-5, atol=1e-6)
    # rank 1 trained layer 1 and wrote its checkpoint; rank 0 alone wrote the output
    assert (tmp_path / "two.safetensors.ckpt" / "layer_001.safetensors").is_file()


# ----------------------------------------------------------------------------- commands
def _byte_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk)
    fast.save_pretrained(path)
    return len(vocab)


def test_train_hash_and_eval_commands(tmp_path):
    from kvcomp.cli import main

    model_dir = tmp_path / "model"
    n_vocab = _byte_tokenizer(model_dir)
    tiny_llama(vocab=n_vocab, seed=7).save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog while the cat sleeps. " * 30) +
                    ("Numbers like 12 and 345 appear here and there in this essay. " * 30))
    out = tmp_path / "w.safetensors"
    stats = tmp_path / "train.json"
    rc = main(["train-hash", "--model", str(model_dir), "--data", str(text), "--bits", "32",
               "--out", str(out), "--doc-tokens", "300", "--max-docs", "3", "--epochs", "2", "--iters", "3",
               "--n-queries", "8", "--json", str(stats), "--no-progress"])
    assert rc == 0 and HashWeights.load(out).trained
    assert json.loads(stats.read_text())["documents"] >= 2
    res = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(model_dir), "--hash-weights", str(out), "--json", str(res),
               "--plots", str(tmp_path / "plots"), "--data", str(text), "--context", "200",
               "--window", "20", "--docs", "2", "--budgets", "0.2,1.0", "--mode-budgets", "0.2",
               "--bits", "32", "--chunk", "4", "--task-haystacks", "1", "--task-context", "1400",
               "--no-progress"])
    assert rc == 0
    r = json.loads(res.read_text())
    assert r["setup"]["positions"] == 40
    assert r["nll"]["trained-sum@1"]["nll_diff"] == pytest.approx(0.0, abs=1e-5)
    assert r["fidelity"]["oracle"]["1.0"]["mass"] == pytest.approx(1.0, abs=1e-5)
    assert {"random-sum@0.2", "trained-sum@0.2", "oracle@0.2", "trained-majority@0.2",
            "trained-mean@0.2"} <= set(r["nll"])
    assert set(r["tasks"]) == {"dense", "random-sum@0.2", "trained-sum@0.2", "oracle@0.2"}
    assert (tmp_path / "plots" / "report.md").is_file()
    assert (tmp_path / "plots" / "captured_mass.png").is_file()
    # bad input: a clear message, exit 1
    assert main(["eval", "--model", str(model_dir), "--hash-weights", str(out), "--json", str(res),
                 "--data", str(text), "--bits", "64", "--no-progress"]) == 1
    assert main(["train-hash", "--model", str(model_dir), "--data", str(tmp_path / "missing.txt"),
                 "--out", str(out)]) == 1
