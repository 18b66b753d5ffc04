"""Hash weights: orthogonality, Haar construction, determinism pins, safetensors schema."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from kvcomp.config import ConfigError, KVCompConfig
from kvcomp.hashing import HashWeights, _seed_of, haar_orthogonal, orthogonal_projection
from kvcomp.ops.hash_encode import hash_encode_ref
from safetensors.torch import save_file


def fixed_input(rows: int, dim: int) -> torch.Tensor:
    """Machine-independent float32 input: small rationals from integer arithmetic."""
    i = torch.arange(rows).view(-1, 1)
    d = torch.arange(dim).view(1, -1)
    return (((i * 31 + d * 17 + i * d) % 23) - 11).to(torch.float32) / 7


def codes_digest(w: torch.Tensor) -> str:
    """sha256 of the packed codes of fixed_input under each head's projection."""
    x = fixed_input(257, w.shape[-2])
    codes = torch.stack([hash_encode_ref(x, w[h]) for h in range(w.shape[0])])
    return hashlib.sha256(codes.numpy().tobytes()).hexdigest()


def block_gram_error(w: torch.Tensor, dim: int) -> float:
    """max |B^T B - I| over the [dim, <=dim] column blocks of every head of w [H, dim, bits]."""
    err = 0.0
    for h in range(w.shape[0]):
        for start in range(0, w.shape[-1], dim):
            b = w[h, :, start:start + dim].double()
            g = b.T @ b
            err = max(err, (g - torch.eye(g.shape[0], dtype=g.dtype)).abs().max().item())
    return err


@pytest.mark.parametrize("dim,bits", [(64, 64), (64, 128), (64, 96), (128, 32), (48, 160), (1, 32)])
def test_random_weights_orthogonal_per_block(dim, bits):
    w = orthogonal_projection(3, dim, bits, seed=5, layer=2)
    assert w.shape == (3, dim, bits) and w.dtype == torch.float32 and w.is_contiguous()
    assert block_gram_error(w, dim) < 1e-5
    # heads are independent draws, and stacked blocks are independent of each other
    assert not torch.allclose(w[0], w[1])
    if bits > dim >= 2:
        assert (w[0, :, :dim].T @ w[0, :, dim:2 * dim]).abs().max() > 1e-2


def test_haar_construction_matches_qr_with_sign_fix():
    """Our Householder Q equals LAPACK's Q with columns flipped so that diag(R) > 0."""
    seeds = [_seed_of(0, "key", 0, h, 0) for h in range(4)]
    q = haar_orthogonal(seeds, 37)
    for k, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        a = torch.randn(37, 37, generator=g, dtype=torch.float64)
        ql, rl = torch.linalg.qr(a)
        ql = ql * torch.sign(torch.diagonal(rl)).unsqueeze(0)
        assert (q[k] - ql).abs().max() < 1e-12
        r = q[k].T @ a
        assert torch.tril(r, -1).abs().max() < 1e-12 and (torch.diagonal(r) > 0).all()


def test_layers_heads_seeds_differ_and_repeat():
    a = HashWeights.random(3, 2, 32, 64, seed=1)
    b = HashWeights.random(3, 2, 32, 64, seed=1)
    c = HashWeights.random(3, 2, 32, 64, seed=2)
    assert torch.equal(a.layer(1), b.layer(1))
    assert not torch.allclose(a.layer(1), c.layer(1))
    assert not torch.allclose(a.layer(0), a.layer(1))
    # a layer does not depend on which other layers were generated first
    assert torch.equal(HashWeights.random(3, 2, 32, 64, seed=1).layer(2), a.layer(2))
    # bits < head_dim keeps the first columns of the same block
    narrow = HashWeights.random(3, 2, 64, 32, seed=1).layer(0)
    wide = HashWeights.random(3, 2, 64, 128, seed=1).layer(0)
    assert torch.equal(narrow, wide[..., :32])


# Pins: same seed, same weights on every machine. Digests of codes are robust to last-bit
# float differences; the values below are checked to 1e-6.
PIN_GQA = "bd222bc2e039273c7a76e6d629acf61ba004bdf957bea4b072e42ffcfc22bb54"
PIN_MLA_LAT = "48cc65dfe0752031f5fd8d2f3cde298a8ca7db25b853c0eab4740eaa8088fdff"
PIN_MLA_ROPE = "20914c04b411b1d07f5dfa44836b95268595ba7ed2e50a7c2ae04b6a833f4138"
PIN_VALUES = [0.059568, -0.045227, -0.010781]


def test_determinism_pins():
    w = HashWeights.random(4, 3, 64, 128, seed=1234).layer(3)
    assert codes_digest(w) == PIN_GQA
    got = [round(float(w[h, d, b]), 6) for h, d, b in [(0, 0, 0), (1, 5, 70), (2, 63, 127)]]
    assert got == pytest.approx(PIN_VALUES, abs=1e-6)
    m = HashWeights.random_mla(2, 96, 32, bits_kv=128, bits_rope=64, seed=7)
    assert codes_digest(m.latent(1)) == PIN_MLA_LAT
    assert codes_digest(m.rope(1)) == PIN_MLA_ROPE


def test_layer_device_dtype_and_errors():
    hw = HashWeights.random(2, 2, 16, 32)
    assert hw.layer(0, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert hw.layer(1).device.type == "cpu"
    with pytest.raises(IndexError, match="layer"):
        hw.layer(2)
    with pytest.raises(ValueError, match="latent"):
        hw.latent(0)
    m = HashWeights.random_mla(1, 32, 16, bits_kv=32, bits_rope=32)
    assert m.latent(0).shape == (1, 32, 32) and m.rope(0).shape == (1, 16, 32)
    with pytest.raises(ValueError, match="layer"):
        m.layer(0)
    with pytest.raises(ConfigError, match="bits"):
        HashWeights.random(2, 2, 16, 48)
    with pytest.raises(ConfigError, match="num_kv_heads"):
        HashWeights.random(2, 0, 16, 32)
    with pytest.raises(ConfigError, match="seed"):
        HashWeights.random(2, 1, 16, 32, seed=-1)


def test_save_load_round_trip_gqa(tmp_path):
    hw = HashWeights.random(3, 2, 16, 64, seed=9, model_name="toy/model")
    p = tmp_path / "h.safetensors"
    hw.save(p)
    back = HashWeights.load(p)
    assert back.kind == "gqa" and back.model_name == "toy/model" and back.seed == 9
    assert (back.num_layers, back.num_kv_heads, back.head_dim, back.bits) == (3, 2, 16, 64)
    for i in range(3):
        assert torch.equal(back.layer(i), hw.layer(i))
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        md = f.metadata()
        assert sorted(f.keys()) == ["layers.0.key", "layers.1.key", "layers.2.key"]
    assert md["format"] == "kvcomp-hash-weights" and md["version"] == "1"
    assert md["bits"] == "64" and md["trained"] == "0" and md["num_kv_heads"] == "2"


def test_save_load_round_trip_mla_and_trained(tmp_path):
    m = HashWeights.random_mla(2, 32, 16, bits_kv=64, bits_rope=32, seed=3)
    p = tmp_path / "m.safetensors"
    m.save(p)
    back = HashWeights.load(p)
    assert back.kind == "mla" and back.bits == 96
    for i in range(2):
        assert torch.equal(back.latent(i), m.latent(i)) and torch.equal(back.rope(i), m.rope(i))
    layers = [torch.randn(2, 8, 32) for _ in range(2)]
    t = HashWeights.from_tensors(layers, model_name="trained-toy")
    t.save(tmp_path / "t.safetensors")
    tb = HashWeights.load(tmp_path / "t.safetensors")
    assert tb.trained and torch.equal(tb.layer(1), layers[1])


def _write(path, tensors, **meta):
    base = {"format": "kvcomp-hash-weights", "version": "1", "kind": "gqa", "num_layers": "2",
            "num_kv_heads": "2", "head_dim": "8", "bits": "32", "seed": "0", "trained": "1",
            "model_name": "x"}
    base.update(meta)
    save_file(tensors, str(path), metadata={k: v for k, v in base.items() if v is not None})


def _good():
    return {f"layers.{i}.key": torch.randn(2, 8, 32) for i in range(2)}


@pytest.mark.parametrize(
    "tensors,meta,phrase",
    [
        ({"dummy": torch.zeros(1)}, {}, "missing tensor"),
        ({"layers.0.key": torch.randn(2, 8, 32)}, {}, "layers.1.key"),
        ({**_good(), "layers.2.key": torch.randn(2, 8, 32)}, {}, "unexpected tensor"),
        ({**_good(), "layers.1.key": torch.randn(2, 8, 64)}, {}, "shape (2, 8, 64)"),
        ({**_good(), "layers.1.key": torch.randn(2, 8, 32).half()}, {}, "dtype"),
        ({**_good(), "layers.0.key": torch.full((2, 8, 32), float("nan"))}, {}, "non-finite"),
        (_good(), {"format": "other"}, "format"),
        (_good(), {"version": "2"}, "version"),
        (_good(), {"kind": "mha"}, "kind"),
        (_good(), {"bits": None}, "bits"),
        (_good(), {"bits": "33"}, "bits"),
        (_good(), {"num_layers": "two"}, "num_layers"),
        (_good(), {"trained": "yes"}, "trained"),
    ],
)
def test_load_schema_errors(tmp_path, tensors, meta, phrase):
    p = tmp_path / "w.safetensors"
    _write(p, tensors, **meta)
    with pytest.raises(ConfigError) as err:
        HashWeights.load(p)
    assert phrase in str(err.value), str(err.value)


def test_load_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        HashWeights.load(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        HashWeights.load(junk)


def test_check_against_names_mismatches():
    hw = HashWeights.random(4, 2, 64, 128, model_name="m")
    hw.check_against(num_layers=4, num_kv_heads=2, head_dim=64, bits=128)
    with pytest.raises(ConfigError) as err:
        hw.check_against(num_layers=5, num_kv_heads=2, head_dim=128, bits=128)
    msg = str(err.value)
    assert "num_layers: the model has 5, the hash weights have 4" in msg
    assert "head_dim: the model has 128, the hash weights have 64" in msg
    assert "num_kv_heads" not in msg
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        hw.check_against(kv_lora_rank=512)


def _cfg(**over) -> KVCompConfig:
    d = dict(model_name="toy", num_hidden_layers=2, head_dim=8, hash_bits=32,
             top_k_ratio_per_layer=[1.0, 0.5], seed=4)
    d.update(over)
    return KVCompConfig(**d)


def test_from_config_random_and_trained(tmp_path):
    hw = HashWeights.from_config(_cfg(), num_kv_heads=2)
    assert torch.equal(hw.layer(1), HashWeights.random(2, 2, 8, 32, seed=4).layer(1))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        HashWeights.from_config(_cfg())
    path = tmp_path / "t.safetensors"
    HashWeights.from_tensors([torch.randn(2, 8, 32) for _ in range(2)]).save(path)
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps(
        {**_cfg().to_dict(), "hash_weight_type": "trained", "hash_weights_path": "t.safetensors"}
    ))
    cfg = KVCompConfig.from_json(cfg_file)
    assert HashWeights.from_config(cfg, num_kv_heads=2).trained
    with pytest.raises(ConfigError, match="num_kv_heads: the model has 4"):
        HashWeights.from_config(cfg, num_kv_heads=4)
    with pytest.raises(ConfigError, match="bits: the model has 64"):
        HashWeights.from_config(cfg.replace(hash_bits=64), num_kv_heads=2)
    mla = KVCompConfig(model_name="ds", is_mla=True, num_hidden_layers=2, kv_lora_rank=32,
                       qk_rope_head_dim=16, hash_bits="64+32", top_k_ratio_per_layer=[1.0, 0.5])
    m = HashWeights.from_config(mla)
    assert m.latent(0).shape == (1, 32, 64) and m.rope(1).shape == (1, 16, 32)
