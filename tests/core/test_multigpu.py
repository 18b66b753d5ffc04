"""kvcomp over 2 GPUs (marked ``multigpu``: skipped with a reason below 2 CUDA devices).

1. The public ops on the second GPU while the first is the current device (what a model split
   by ``device_map`` does: accelerate moves tensors between layers but never changes the
   current device) equal the same ops on the first GPU.
2. A Qwen3-shaped model (random fp32 weights built here) split over cuda:0 and cuda:1, by an
   explicit ``device_map`` and by ``device_map="auto"`` (accelerate's placement, cuda:0 capped
   by ``max_memory`` below the model's size so that the split is certain), decodes with
   ``kvcomp.enable`` exactly like the same model on cuda:0: same greedy tokens, logits within
   1e-4 (fp32 so the comparison is tight: the two runs execute the same kernels on the same
   GPU model; only where the tensors live differs).
   Every cache layer's keys, values, lengths and codes live on its layer's device; the sparse
   layers of both GPUs read a fraction of their blocks.
3. ``kvcomp train-hash`` and ``kvcomp eval`` under ``accelerate launch --multi_gpu
   --num_processes 2`` with ``--device cuda`` (rank r on cuda:r) equal one process
   (``test_distributed.check_two_processes_equal_one``). Timings at a size where a speedup
   shows are taken by ``tools/gpu_multi.sh``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.multigpu
transformers = pytest.importorskip("transformers")

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 6, 8, 4, 64
PROMPT, NEW = 300, 24
DEV0, DEV1 = "cuda:0", "cuda:1"


def _checks():
    spec = importlib.util.spec_from_file_location(
        "_kvcomp_distributed_checks", Path(__file__).resolve().parent / "test_distributed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def qwen3_dir(path: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).eval().save_pretrained(path)
    return path


def split_map(dev0, dev1) -> dict:
    """Layers 0-2 (embedding, rotary) on dev0, layers 3-5 (norm, head) on dev1."""
    dm = {"model.embed_tokens": dev0, "model.rotary_emb": dev0, "model.norm": dev1, "lm_head": dev1}
    dm.update({f"model.layers.{i}": (dev0 if i < LAYERS // 2 else dev1) for i in range(LAYERS)})
    return dm


def generate(model, ids):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              return_dict_in_generate=True, output_logits=True, pad_token_id=0)


def check_split_model(tmp_path, dev0, dev1, auto: bool = False) -> None:
    """``auto``: ``device_map="auto"`` with cuda:0 capped at 60% of the model's bytes (else the
    explicit layers 0-2 / 3-5 map)."""
    import kvcomp
    from kvcomp.config import KVCompConfig
    from transformers import AutoModelForCausalLM

    path = qwen3_dir(tmp_path / "qwen3")
    one = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev0).eval()
    if auto:
        size = sum(p.numel() * p.element_size() for p in one.parameters())
        placement = {"device_map": "auto", "max_memory": {0: int(0.6 * size), 1: 4 * size}}
    else:
        placement = {"device_map": split_map(dev0, dev1)}
    split = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **placement).eval()
    print("hf_device_map:", getattr(split, "hf_device_map", None))
    devices = [torch.device(m.self_attn.q_proj.weight.device) for m in split.model.layers]
    assert {str(d) for d in devices} == {str(torch.device(dev0)), str(torch.device(dev1))}, devices
    # layer 0 dense, layers 1-5 select a quarter of their 16-token blocks after 64 tokens
    cfg = KVCompConfig.default("qwen3", LAYERS, HEAD_DIM, ratio=0.25, chunk_size=16, threshold=64,
                               dense_layers=1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1024, (1, PROMPT), generator=g)
    dense = generate(one, ids.to(dev0))
    h1 = kvcomp.enable(one, cfg)
    ref = generate(one, ids.to(dev0))
    h1.disable()
    h2 = kvcomp.enable(split, cfg)
    out = generate(split, ids.to(dev0))
    cache, stats = h2.last_cache, h2.stats
    bindings = [m.self_attn._kvcomp for m in split.model.layers]
    h2.disable()

    assert torch.equal(out.sequences.cpu(), ref.sequences.cpu())
    diff = max((a.float().cpu() - b.float().cpu()).abs().max().item() for a, b in zip(out.logits, ref.logits))
    assert diff <= 1e-4, f"split vs one-GPU logits differ by {diff}"
    sparse_diff = max((a.cpu() - b.cpu()).abs().max().item() for a, b in zip(ref.logits[1:], dense.logits[1:]))
    assert sparse_diff > 1e-3, "kvcomp gave the dense logits: the sparse path did not run"

    total = PROMPT + NEW - 1
    assert cache.get_seq_length() == total
    for i, layer in enumerate(cache.layers):
        dev = devices[i]
        assert layer.keys_buf.device == dev and layer.values_buf.device == dev, f"layer {i}"
        assert layer.seq_lens.device == dev and layer.seq_lens.tolist() == [total]
        if i == 0:
            assert layer.codes_buf is None
        else:
            assert layer.codes_buf is not None and layer.codes_buf.device == dev, f"layer {i} codes"
            assert bindings[i].kv_weight.device == dev
    assert stats["layers"][0]["share_read"] == 1.0
    for i in range(1, LAYERS):
        s = stats["layers"][i]
        assert s["steps"]["compute"] == NEW - 1, f"layer {i}: {s['steps']}"
        assert 0 < s["share_read"] < 0.6, f"layer {i} read {s['share_read']}"


def test_ops_follow_their_tensors_device():
    """hash_encode, hamming_topk and sparse_decode_attention on cuda:1 equal the same calls on
    cuda:0 bit for bit: first with cuda:1 made current (the kernels themselves), then with
    cuda:0 current, as in a model split by ``device_map`` (the ops must launch on their
    tensors' device, not on the current one)."""
    from kvcomp.ops import hamming_topk, hash_encode, sparse_decode_attention

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, D, bits, C = 2, 8, 4, 1000, 64, 128, 16
    q = torch.randn(B, Hq, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    w = torch.randn(Hkv, D, bits, generator=g)
    wq = w.repeat_interleave(Hq // Hkv, 0)
    lens = torch.tensor([1000, 777])

    def run(dev):
        kc = hash_encode(k.to(dev), w.to(dev))
        qc = hash_encode(q.to(dev).unsqueeze(2), wq.to(dev)).squeeze(2)
        bi = hamming_topk(qc, kc, lens.to(dev), k_blocks=8, chunk_size=C)
        o = sparse_decode_attention(q.to(dev), k.to(dev), v.to(dev), bi, lens.to(dev), chunk_size=C)
        torch.cuda.synchronize(dev)
        return [t.cpu() for t in (kc, qc, bi, o)]

    names = ("key codes", "query codes", "block_idx", "output")
    torch.cuda.set_device(0)
    want = run(DEV0)
    with torch.cuda.device(1):
        current1 = run(DEV1)
    for name, a, b in zip(names, want, current1):
        assert torch.equal(a, b), f"{name} on cuda:1 (current) differ from cuda:0"
    got = run(DEV1)  # cuda:0 is the current device
    for name, a, b in zip(names, want, got):
        assert torch.equal(a, b), f"{name} on cuda:1 while cuda:0 is current differ: missing device guard"


def test_qwen3_split_over_two_gpus_decodes_like_one(tmp_path):
    torch.cuda.set_device(0)
    check_split_model(tmp_path, DEV0, DEV1)


def test_qwen3_device_map_auto_decodes_like_one(tmp_path):
    torch.cuda.set_device(0)
    check_split_model(tmp_path, DEV0, DEV1, auto=True)


def test_train_hash_and_eval_two_gpus_equal_one(tmp_path):
    _checks().check_two_processes_equal_one(tmp_path, "cuda")
