"""RULER-style synthetic long-context tasks in essay haystacks, scored dense vs kvcomp.

Each haystack is a run of held-out essay text of ``context_tokens`` tokens into which the
needles of all four task kinds are inserted at seeded depths (so every haystack also holds
distractors for every question):

* ``single_needle``      "One of the special magic numbers for {key} is: {number}." (3 per
                         haystack, distinct keys); asked: the number of one key.
* ``multi_key``          four needles whose keys differ only by a suffix ("{word}-1" .. "-4");
                         asked: the number of one of them.
* ``multi_value``        three needles with the same key and different numbers; asked: all
                         three, in order of appearance.
* ``variable_tracking``  "VAR A = {number}." then "VAR B = VAR A." ... (a chain of 4 names,
                         spread over the haystack); asked: every variable holding {number}.

Scoring (greedy exact match, teacher-forced): the haystack is prefilled densely once; for a
question, the question is prefilled on top of it (dense) except its last token; then the last
question token and the answer tokens go through a window pass in which every position attends
as a decode step (``kvcomp.eval.window``). An answer is correct when the model's argmax at every
answer position is the answer token, which is exactly "greedy decoding produces the answer".
This is stricter than ``generate()``, where the first answer token comes from the dense
prefill. Everything is deterministic for a seed. Haystacks are independent:
``score_haystacks`` scores any subset (one process's share), ``combine_scores`` unites them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from kvcomp.eval.window import SparseSpec, crop_cache, window_logits

TASKS = ("single_needle", "multi_key", "multi_value", "variable_tracking")
_WORDS = ("amber", "basil", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo",
          "juniper", "kestrel", "lagoon", "meadow", "nickel", "orchid", "pepper", "quartz",
          "raven", "saffron", "tundra", "umber", "violet", "willow", "yarrow", "zephyr")
_VARS = ("QXJ", "BRT", "LMV", "ZPW", "KDF", "HNS", "YGC", "WUE")


@dataclass
class Question:
    task: str
    prompt: str  # appended after the haystack
    answer: str  # the expected continuation (starts with a space)


@dataclass
class Haystack:
    text: str
    questions: list[Question]


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def build_haystack(base_text: str, tokenizer, context_tokens: int, rng: random.Random) -> Haystack:
    """Insert the needles of all four tasks into ``base_text`` (cut to leave room for them)."""
    words = rng.sample(_WORDS, 5)
    needles: list[str] = []
    questions: list[Question] = []
    ask = "\n\nQuestion: What is the special magic number for {k} mentioned in the text above?\nAnswer: The special magic number for {k} is"
    for k in words[:3]:
        v = _number(rng)
        needles.append(f"One of the special magic numbers for {k} is: {v}.")
        questions.append(Question("single_needle", ask.format(k=k), f" {v}."))
    base = words[3]
    mk = [(f"{base}-{i}", _number(rng)) for i in range(1, 5)]
    needles.extend(f"One of the special magic numbers for {k} is: {v}." for k, v in mk)
    k, v = mk[rng.randrange(4)]
    questions.append(Question("multi_key", ask.format(k=k), f" {v}."))
    mv_key = words[4]
    mv = [_number(rng) for _ in range(3)]
    mv_needles = [f"One of the special magic numbers for {mv_key} is: {x}." for x in mv]
    questions.append(Question(
        "multi_value",
        f"\n\nQuestion: What are all the special magic numbers for {mv_key} mentioned in the text "
        f"above, in order?\nAnswer: The special magic numbers for {mv_key} are",
        " " + ", ".join(mv) + "."))
    names = rng.sample(_VARS, 4)
    val = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {val}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 4)]
    questions.append(Question(
        "variable_tracking",
        f"\n\nQuestion: Find all variables that are assigned the value {val} in the text above."
        "\nAnswer: The variables assigned the value are",
        " " + ", ".join(names) + "."))
    # budget: leave room for needles and the longest question + answer
    extra = sum(len(tokenizer(n, add_special_tokens=False)["input_ids"]) + 2 for n in needles + mv_needles + chain)
    room = context_tokens - extra - 80
    if room < 64:
        raise ValueError(f"context_tokens={context_tokens} leaves no room for the haystack text")
    ids = tokenizer(base_text, add_special_tokens=False)["input_ids"][:room]
    text = tokenizer.decode(ids)
    sentences = text.split(". ")
    # ordered insertions keep multi-value and the variable chain in their order
    ordered = [(rng.random(), n) for n in needles]
    mv_pos = sorted(rng.random() for _ in mv_needles)
    ordered += list(zip(mv_pos, mv_needles))
    ch_pos = sorted(rng.random() for _ in chain)
    ordered += list(zip(ch_pos, chain))
    ordered.sort(key=lambda x: x[0])
    slots: dict[int, list[str]] = {}
    for depth, n in ordered:
        slots.setdefault(int(depth * (len(sentences) - 1)), []).append(n)
    parts = []
    for i, s in enumerate(sentences):
        parts.append(s)
        for n in slots.get(i, []):
            parts.append(" " + n)
    return Haystack(text=". ".join(parts), questions=questions)


def build_haystacks(texts: list[tuple[str, str]], tokenizer, *, n: int, context_tokens: int,
                    seed: int = 0) -> list[Haystack]:
    """``n`` haystacks from the concatenated texts (disjoint stretches where possible)."""
    full = "\n\n".join(t for _, t in texts)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    span = max(1, min(len(ids) // max(1, n), context_tokens))
    out = []
    for i in range(n):
        start = (i * span) % max(1, len(ids) - context_tokens)
        base = tokenizer.decode(ids[start : start + context_tokens])
        out.append(build_haystack(base, tokenizer, context_tokens, random.Random(seed * 1000 + i)))
    return out


@torch.no_grad()
def score_haystacks(model, tokenizer, haystacks: list[Haystack], specs: list[SparseSpec], *,
                    indices: list[int] | None = None, progress: bool = True) -> dict[int, dict]:
    """Score the haystacks ``indices`` (default: all) by teacher-forced greedy match.

    Returns {haystack index: {spec name ("dense" first): {task: [0/1 per question]}}}."""
    from kvcomp.eval.window import prefill

    indices = list(range(len(haystacks))) if indices is None else list(indices)
    for i in indices:
        if not 0 <= i < len(haystacks):
            raise ValueError(f"haystack index {i} out of range [0, {len(haystacks)})")
    names = ["dense"] + [s.name for s in specs]
    all_specs = [SparseSpec(method="dense")] + list(specs)
    out: dict[int, dict] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(haystacks[i].questions) for i in indices), desc="tasks", unit="question")
    for i in indices:
        h = haystacks[i]
        res = {n: {t: [] for t in TASKS} for n in names}
        h_ids = torch.tensor(tokenizer(h.text, add_special_tokens=False)["input_ids"])
        cache = prefill(model, h_ids)
        H = cache.get_seq_length()
        for q in h.questions:
            q_ids = torch.tensor(tokenizer(q.prompt, add_special_tokens=False)["input_ids"])
            a_ids = torch.tensor(tokenizer(q.prompt + q.answer, add_special_tokens=False)["input_ids"])[q_ids.numel():]
            if q_ids.numel() > 1:
                model(input_ids=q_ids[:-1].view(1, -1).to(model.device), past_key_values=cache, use_cache=True)
            inp = torch.cat([q_ids[-1:], a_ids[:-1]])
            for name, spec in zip(names, all_specs):
                logits, _ = window_logits(model, cache, inp, spec)
                ok = bool(torch.equal(logits.argmax(-1).cpu(), a_ids))
                res[name][q.task].append(int(ok))
            crop_cache(cache, H)
            if bar is not None:
                bar.update(1)
        out[i] = res
    if bar is not None:
        bar.close()
    return out


def combine_scores(per_haystack: dict[int, dict]) -> dict:
    """{haystack index: scores} (from one or several processes, united) -> the scores of all
    haystacks in index order, in ``score_questions``' format."""
    if not per_haystack:
        raise ValueError("combine_scores: no haystacks")
    order = sorted(per_haystack)
    res = {n: {t: [] for t in per} for n, per in per_haystack[order[0]].items()}
    for i in order:
        for n, per in per_haystack[i].items():
            for t, v in per.items():
                res[n][t].extend(v)
    return res


def score_questions(model, tokenizer, haystacks: list[Haystack], specs: list[SparseSpec],
                    *, progress: bool = True) -> dict:
    """{spec name ("dense" first): {task: [0/1 per question]}} by teacher-forced greedy match."""
    return combine_scores(score_haystacks(model, tokenizer, haystacks, specs, progress=progress))


def summarize_tasks(res: dict) -> dict:
    """Accuracy (%) per task and overall with standard errors, and the difference to dense."""
    out = {}
    for name, per in res.items():
        out[name] = {}
        allv = []
        for task, v in per.items():
            if v:
                p = sum(v) / len(v)
                out[name][task] = {"accuracy": 100 * p, "se": 100 * math.sqrt(p * (1 - p) / len(v)), "n": len(v)}
                allv += v
        p = sum(allv) / max(1, len(allv))
        out[name]["overall"] = {"accuracy": 100 * p, "se": 100 * math.sqrt(p * (1 - p) / max(1, len(allv))),
                                "n": len(allv)}
    dense = res.get("dense")
    if dense:
        for name, per in res.items():
            if name == "dense":
                continue
            diffs = [a - b for t in per for a, b in zip(per[t], dense[t])]
            if diffs:
                m = sum(diffs) / len(diffs)
                var = sum((d - m) ** 2 for d in diffs) / max(1, len(diffs) - 1)
                out[name]["overall"]["diff_vs_dense"] = 100 * m
                out[name]["overall"]["diff_se"] = 100 * math.sqrt(var / len(diffs))
    return out
