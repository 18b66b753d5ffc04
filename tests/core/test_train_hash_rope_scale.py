"""Block-rank training with ``param="rope-scale"`` (``train-hash --objective block-rank --param
rope-scale``): W = diag(s) R with one scale per RoPE plane of the random R. Checks the plane
layout against transformers' own ``apply_rotary_pos_emb`` (the scale commutes with RoPE, so the
hash codes of a rotated vector are those of the rotated scaled vector), the structure of the
written weights, that the fit raises the captured mass of kvcomp's hard selection on held-out
data, and the trainer / CLI contract (deterministic, resumable, never mixed with "free")."""

from __future__ import annotations

import pytest
import torch
from kvcomp.hashing import HashWeights
from kvcomp.training import TrainConfig, fit_block_rank, train_hash_weights
from kvcomp.training.block_rank import rope_scale_index

pytest.importorskip("transformers")

from test_train_hash_block_rank import _captured_mass  # noqa: E402
from test_training import _byte_tokenizer, _docs, tiny_llama  # noqa: E402

FAST = dict(objective="block-rank", rank_param="rope-scale", rank_steps=6, n_queries=8, chunk_size=4,
            rank_lr=0.05)


def test_rope_scale_index():
    assert rope_scale_index(8).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert rope_scale_index(8, 4).tolist() == [0, 1, 0, 1, 2, 3, 4, 5]  # partial rotary: 4 free dims
    assert rope_scale_index(6, 6).tolist() == [0, 1, 2, 0, 1, 2]
    for bad in (3, 0, 10):
        with pytest.raises(ValueError, match="rotary_dim"):
            rope_scale_index(8, bad)


@pytest.mark.parametrize("D,rotary", [(16, None), (12, 8)])
def test_plane_scale_commutes_with_transformers_rope(D, rotary):
    """(x S) rotated == (x rotated) S for transformers' apply_rotary_pos_emb (rotate_half
    layout, partial rotary included) at many positions, so sign((x R_t) S R) = sign(((x S) R_t) R)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    r = rotary or D
    g = torch.Generator().manual_seed(D)
    idx = rope_scale_index(D, rotary)
    s = torch.rand(int(idx.max()) + 1, generator=g) * 3 + 0.1
    S = s[idx]
    pos = torch.tensor([0, 1, 63, 127, 129, 1000, 8191]).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
    ang = pos.view(-1, 1) * inv_freq.view(1, -1)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # [T, r]
    x = torch.randn(1, 2, len(pos), D, generator=g)

    def rope(v):
        rot, rest = v[..., :r], v[..., r:]
        a, _ = apply_rotary_pos_emb(rot, rot, cos.unsqueeze(0), sin.unsqueeze(0))
        return torch.cat([a, rest], -1)

    torch.testing.assert_close(rope(x * S), rope(x) * S, rtol=1e-5, atol=1e-5)
    if r == D:  # the interleaved layout (planes (2i, 2i + 1)) does not commute with rotate_half
        wrong = s[torch.arange(D) // 2]
        assert not torch.allclose(rope(x * wrong), rope(x) * wrong, atol=1e-3)
    R = HashWeights.random(1, 1, D, 32, seed=0).layer(0)[0]
    W = S.view(D, 1) * R
    assert torch.equal(rope(x) @ W > 0, (rope(x * S) @ R) > 0)


def _plane_synthetic(g, n_docs, T=256, D=16, G=2, n=48, P=2, chunk=4):
    """The attention lives in one RoPE plane (dims 0 and D/2): each block of keys shares a topic
    there. The queries also carry a large part (norm 8) in the other planes where the keys are
    small noise: it adds little to q . k but dilutes the angle the hash estimates."""
    from kvcomp.training import GroupSet

    plane = torch.tensor([0, D // 2])
    groups = [GroupSet() for _ in range(P)]
    for _ in range(n_docs):
        t = (torch.randperm(T // 2, generator=g)[:n] + T // 2).sort().values
        for p in range(P):
            k = torch.randn(T, D, generator=g) * 0.5
            topic = (torch.randn(T // chunk, 1, 2, generator=g) * 3).expand(-1, chunk, -1).reshape(T, 2)
            k[:, plane] = topic + torch.randn(T, 2, generator=g) * 0.5
            q = torch.nn.functional.normalize(torch.randn(G, n, D, generator=g), dim=-1) * 8
            q[..., plane] = torch.randn(G, n, 2, generator=g) * 3
            groups[p].q.append(q)
            groups[p].k.append(k)
            groups[p].t.append(t)
    return groups


def test_fit_rope_scale_is_a_plane_scale_and_raises_captured_mass():
    g = torch.Generator().manual_seed(0)
    train, held = _plane_synthetic(g, 3), _plane_synthetic(g, 2)
    W0 = HashWeights.random(1, 2, 16, 32, seed=0).layer(0)
    W, hist = fit_block_rank(train, W0, steps=40, lr=0.1, beta=3.0, tau=0.1, chunk=4, param="rope-scale")
    assert len(hist) == 40 and W.shape == W0.shape
    torch.testing.assert_close(W.norm(dim=1), torch.ones(2, 32))
    # W = diag(s) R up to column norms: W / R is rank one, equal on dims i and i + 8
    ratio = W / W0
    for p in range(2):
        u, sv, _ = torch.linalg.svd(ratio[p].double())
        assert sv[1] < 1e-5 * sv[0]
        s = ratio[p, :, 0] / ratio[p, 0, 0]
        torch.testing.assert_close(s[:8], s[8:])
    s_ = ratio[0, :8, 0] / ratio[0, 0, 0]
    assert not torch.allclose(ratio[0, :, 0] / ratio[0, 0, 0], ratio[1, :, 0] / ratio[1, 0, 0])
    assert s_[1:].max() < 0.2 * s_[0]  # the planes without attention signal are turned down
    before, after = _captured_mass(W0, held, 4), _captured_mass(W, held, 4)
    assert after > before + 0.02, (before, after)  # measured: 0.597 -> 0.642
    with pytest.raises(ValueError, match="param"):
        fit_block_rank(train, W0, steps=1, lr=0.01, beta=3.0, tau=0.1, chunk=4, param="rotation")


def test_fit_rope_scale_free_planes_is_free_only_on_the_slowest_planes():
    """free_planes = 2 of D = 16: the dims of planes 6 and 7 (6, 7, 14, 15) get a free block of
    S; the other rows of W stay s_i R (rank-one ratio to R, shared by the two dims of a plane)."""
    g = torch.Generator().manual_seed(1)
    train = _plane_synthetic(g, 2)
    W0 = HashWeights.random(1, 2, 16, 32, seed=0).layer(0)
    W, _ = fit_block_rank(train, W0, steps=20, lr=0.1, beta=3.0, tau=0.1, chunk=4, param="rope-scale",
                          free_planes=2)
    slow = torch.tensor([6, 7, 14, 15])
    rest = torch.tensor([0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13])
    for p in range(2):
        ratio = (W / W0)[p]
        sv = torch.linalg.svdvals(ratio[rest].double())
        assert sv[1] < 1e-5 * sv[0]
        torch.testing.assert_close(ratio[:6, 0], ratio[8:14, 0])
        sv = torch.linalg.svdvals(ratio[slow].double())
        assert sv[1] > 1e-3 * sv[0]  # the slow rows mix: no longer a scale of R
        # the block acts within the slow dims: W[slow] = (diag + A) R[slow] / n (n: the column
        # norms, known up to one factor from a scaled row: ratio[0] = s_0 / n)
        Ws = (W[p, slow] / ratio[0]).T.double()
        M = torch.linalg.lstsq(W0[p, slow].T.double(), Ws).solution
        torch.testing.assert_close(W0[p, slow].T.double() @ M, Ws, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="free_planes must be"):
        fit_block_rank(train, W0, steps=1, lr=0.1, beta=3.0, tau=0.1, chunk=4, param="rope-scale", free_planes=9)
    with pytest.raises(ValueError, match="free_planes is a setting"):
        fit_block_rank(train, W0, steps=1, lr=0.1, beta=3.0, tau=0.1, chunk=4, free_planes=1)


def test_trainer_rope_scale_deterministic_resumable_and_not_mixed(tmp_path):
    m = tiny_llama()
    docs = _docs()
    cfg = TrainConfig(bits=32, **FAST)
    out = tmp_path / "w.safetensors"
    a = train_hash_weights(m, docs, cfg, out=out, progress=False)
    b = train_hash_weights(m, docs, cfg, progress=False)
    assert a.trained and all(torch.equal(a.layer(i), b.layer(i)) for i in range(3))
    rnd = HashWeights.random(3, 2, 16, 32, seed=0)
    for i in range(3):
        ratio = a.layer(i) / rnd.layer(i)  # diag(s) R with unit columns: rank one per head
        for h in range(2):
            sv = torch.linalg.svdvals(ratio[h].double())
            assert sv[1] < 1e-5 * sv[0] and ratio[h].std(1).max() > 1e-4
    free = train_hash_weights(m, docs, TrainConfig(bits=32, **{**FAST, "rank_param": "free"}), progress=False)
    assert (free.layer(0) - a.layer(0)).abs().max() > 1e-3
    (tmp_path / "w.safetensors.ckpt" / "layer_001.safetensors").unlink()
    r = train_hash_weights(m, docs, cfg, out=out, resume=True, progress=False)
    assert r.train_stats["layers_resumed"] == [0, 2] and r.train_stats["layers_trained"] == [1]
    assert all(torch.equal(r.layer(i), a.layer(i)) for i in range(3))
    with pytest.raises(ValueError, match="other settings .*rank_param"):
        train_hash_weights(m, docs, TrainConfig(bits=32, **{**FAST, "rank_param": "free"}), out=out,
                           resume=True, progress=False)
    with pytest.raises(ValueError, match="other settings .*rank_free_planes"):
        train_hash_weights(m, docs, TrainConfig(bits=32, **{**FAST, "rank_free_planes": 1}), out=out,
                           resume=True, progress=False)
    with pytest.raises(ValueError, match="rank_param"):
        TrainConfig(rank_param="rotation").validate()
    with pytest.raises(ValueError, match="rank_param is a setting"):
        TrainConfig(rank_param="rope-scale").validate()  # objective "hata"
    with pytest.raises(ValueError, match="rank_free_planes is a setting"):
        TrainConfig(objective="block-rank", rank_free_planes=2).validate()
    with pytest.raises(ValueError, match="exceeds the model's 8 RoPE planes"):
        train_hash_weights(m, docs, TrainConfig(bits=32, **{**FAST, "rank_free_planes": 9}), progress=False)


def test_train_hash_command_rope_scale(tmp_path, capsys):
    import json

    from kvcomp.cli import main

    model_dir = tmp_path / "model"
    n_vocab = _byte_tokenizer(model_dir)
    tiny_llama(vocab=n_vocab, seed=7).save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps. " * 30)
    out = tmp_path / "w.safetensors"
    stats = tmp_path / "train.json"
    base = ["train-hash", "--model", str(model_dir), "--data", str(text), "--bits", "32", "--out", str(out),
            "--doc-tokens", "300", "--max-docs", "2", "--no-progress"]
    assert main(base + ["--param", "rope-scale"]) == 1  # a block-rank setting
    assert "--param is a block-rank setting" in capsys.readouterr().err
    rc = main(base + ["--objective", "block-rank", "--param", "rope-scale", "--rank-steps", "4",
                      "--chunk", "8", "--json", str(stats)])
    assert rc == 0
    hw = HashWeights.load(out)
    assert hw.trained and hw.bits == 32
    cfg = json.loads(stats.read_text())["config"]
    assert cfg["rank_param"] == "rope-scale" and cfg["rank_steps"] == 4
    assert cfg["n_queries"] == 64 and cfg["rank_lr"] == 0.05  # the rope-scale defaults
    assert cfg["rank_free_planes"] == 0
    assert main(base + ["--objective", "block-rank", "--rope-free-planes", "2"]) == 1  # needs rope-scale
    assert "rank_free_planes is a setting" in capsys.readouterr().err
    rc = main(base + ["--objective", "block-rank", "--param", "rope-scale", "--rope-free-planes", "2",
                      "--rank-steps", "3", "--chunk", "8", "--json", str(stats)])
    assert rc == 0 and json.loads(stats.read_text())["config"]["rank_free_planes"] == 2
