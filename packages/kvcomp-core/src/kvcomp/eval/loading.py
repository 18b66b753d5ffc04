"""Models and texts for ``kvcomp train-hash`` and ``kvcomp eval``.

Model specs: ``smollm2`` (SmolLM2-135M-Instruct via ``kvcomp.data``), a folder with an HF
checkpoint, or a ``.gguf`` file. Text specs: a text file, a folder (its ``*.txt`` files, sorted),
or ``essays:train`` / ``essays:heldout`` (optionally ``essays:train:SEED:N_TRAIN``): the
train / held-out parts of ``kvcomp.data.split_essays(seed, n_train)`` (defaults 0 and 12).
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_model(spec: str, *, device: str = "cpu", dtype=torch.float32):
    """(model, tokenizer) for a model spec (see module docstring), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "smollm2":
        from kvcomp.data import load_smollm2

        return load_smollm2(device=device, dtype=dtype)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--model {spec!r}: no such file or folder (or use 'smollm2')")
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval(), tok


def load_texts(specs: list[str]) -> list[tuple[str, str]]:
    """[(name, text)] for text specs (see module docstring), in the given order."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        if spec.startswith("essays:"):
            from kvcomp.data import split_essays

            parts = spec.split(":")
            if parts[1] not in ("train", "heldout") or len(parts) not in (2, 4):
                raise ValueError(f"text spec {spec!r}: expected essays:train|heldout[:SEED:N_TRAIN]")
            seed, n_train = (int(parts[2]), int(parts[3])) if len(parts) == 4 else (0, 12)
            train, held = split_essays(seed=seed, n_train=n_train)
            out.extend(train if parts[1] == "train" else held)
            continue
        path = Path(spec)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise ValueError(f"text folder {spec!r} has no *.txt files")
            out.extend((f.stem, f.read_text(encoding="utf-8", errors="replace")) for f in files)
        elif path.is_file():
            out.append((path.stem, path.read_text(encoding="utf-8", errors="replace")))
        else:
            raise FileNotFoundError(f"text {spec!r}: no such file or folder")
    return out


def make_documents(texts: list[tuple[str, str]], tokenizer, doc_tokens: int,
                   max_docs: int | None = None) -> list[torch.Tensor]:
    """Concatenate the texts (blank line between them) and cut the tokens into consecutive,
    disjoint documents of exactly ``doc_tokens`` tokens (a shorter tail is dropped unless it is
    the only document). Returns [T] int64 tensors."""
    if doc_tokens < 4:
        raise ValueError(f"doc_tokens must be >= 4, got {doc_tokens}")
    ids: list[int] = []
    for _, text in texts:
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
    all_ids = torch.tensor(ids, dtype=torch.long)
    docs = [all_ids[s : s + doc_tokens] for s in range(0, all_ids.numel() - doc_tokens + 1, doc_tokens)]
    if not docs and all_ids.numel() >= 4:
        docs = [all_ids]
    return docs[:max_docs] if max_docs else docs
