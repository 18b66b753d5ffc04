"""``kvcomp.distributed`` and the two commands under ``accelerate launch`` on the CPU (gloo).

One launch of 2 processes (``accelerate launch --multi_gpu --num_processes 2``: accelerate's
torchrun path, which also runs on CPU-only machines) runs ``kvcomp train-hash`` and then
``kvcomp eval`` through the CLI; both must equal the same commands run in one process:
the trained weights within float tolerance, the eval JSON exactly (every number; only the
timings and the process count differ). 3 layers, 3 documents and 3 haystacks, so the split
over 2 ranks is uneven. The 2-process training through the Python API under torchrun is
``tests/core/test_training.py::test_two_process_training_matches_one``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from kvcomp import distributed
from kvcomp.hashing import HashWeights

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


# ----------------------------------------------------------------------------- helpers
def test_shard_covers_every_item_once():
    for n in (0, 1, 2, 7):
        for world in (1, 2, 3):
            parts = [distributed.shard(n, distributed.DistContext(rank=r, world=world)) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))
            assert all(p == list(range(r, n, world)) for r, p in enumerate(parts))


def test_env_ranks_and_alone(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.env_ranks() == (0, 1, 0)
    ctx = distributed.init()
    assert (ctx.rank, ctx.world, ctx.owned, ctx.is_main, ctx.active) == (0, 1, False, True, False)
    assert distributed.gather({"x": 1}, ctx) == [{"x": 1}]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.env_ranks() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4"):
        distributed.env_ranks()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.env_ranks()


def test_local_device(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.local_device("cpu") == "cpu"
    assert distributed.local_device("cuda:0") == "cuda:0"
    if torch.cuda.device_count() < 2:
        with pytest.raises(RuntimeError, match="CUDA|LOCAL_RANK=1"):
            distributed.local_device("cuda")


# ----------------------------------------------------------------------------- split + combine
def test_split_documents_combine_to_the_one_run():
    """Documents scored in two shares (out of order) and united give the one-run tensors."""
    from kvcomp.eval.fidelity import FidelityProbe, HashMethod
    from kvcomp.eval.nll import combine_documents, evaluate_documents, evaluate_nll
    from kvcomp.eval.window import SparseSpec
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=8, max_position_embeddings=256)).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 61, (40,), generator=g) for _ in range(3)]
    hw = HashWeights.random(2, 2, 8, 32, seed=0)
    specs = [SparseSpec(method="hash", ratio=0.5, weights=hw, chunk_size=4, dense_layers=()),
             SparseSpec(method="oracle", ratio=0.5, chunk_size=4, dense_layers=())]

    def probe():
        return FidelityProbe([HashMethod("random-sum", hw)], ratios=(0.25, 0.5), chunk_size=4)

    whole_probe, a_probe, b_probe = probe(), probe(), probe()
    whole = evaluate_nll(model, docs, specs, window=12, probe=whole_probe, progress=False)
    recs = evaluate_documents(model, docs, specs, indices=[2, 0], window=12, probe=a_probe, progress=False)
    recs.update(evaluate_documents(model, docs, specs, indices=[1], window=12, probe=b_probe, progress=False))
    a_probe.merge_state(b_probe.state())
    split = combine_documents(recs)
    for name in ("dense", *(s.name for s in specs)):
        assert torch.equal(split[name]["nll"], whole[name]["nll"])
        assert torch.equal(split[name]["argmax"], whole[name]["argmax"])
    assert split[specs[0].name]["attended"] == whole[specs[0].name]["attended"] > 0
    assert torch.equal(a_probe.per_position(a_probe.mass, "oracle", 0.25, [0, 1]),
                       whole_probe.per_position(whole_probe.mass, "oracle", 0.25, [0, 1]))
    assert a_probe.summary([0, 1]) == whole_probe.summary([0, 1])
    with pytest.raises(ValueError, match="observed twice"):
        a_probe.merge_state(b_probe.state())
    with pytest.raises(ValueError, match="document index 3"):
        evaluate_documents(model, docs, specs, indices=[3], window=12, progress=False)


# ----------------------------------------------------------------------------- 2 processes
def _byte_tokenizer(path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(path)
    return len(vocab)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# runs the CLI twice in one process (one launch, one interpreter start-up per rank)
_DRIVER = """
import sys
from kvcomp.cli import main
args = sys.argv[1:]
cut = args.index("--then")
rc = main(args[:cut]) or main(args[cut + 1:])
sys.exit(rc)
"""


def _without_timing(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in ("seconds", "processes")}


def test_accelerate_two_processes_equal_one(tmp_path):
    check_two_processes_equal_one(tmp_path, "cpu")


def check_two_processes_equal_one(tmp_path, device: str) -> None:
    """The 2-process check, on ``device`` ("cpu", or "cuda": one GPU per rank; tests/core/
    test_multigpu.py runs it so)."""
    from kvcomp.cli import main
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "model"
    vocab = _byte_tokenizer(model_dir)
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
    LlamaForCausalLM(cfg).eval().save_pretrained(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog while the cat sleeps. " * 25) +
                    ("Numbers like 12 and 345 appear here and there in this essay. " * 25))

    def train_args(out, stats):
        return ["train-hash", "--model", str(model_dir), "--data", str(text), "--bits", "32",
                "--out", str(out), "--doc-tokens", "300", "--max-docs", "3", "--epochs", "2",
                "--iters", "3", "--n-queries", "8", "--json", str(stats), "--device", device,
                "--no-progress"]

    def eval_args(weights, res, plots):
        return ["eval", "--model", str(model_dir), "--hash-weights", str(weights), "--json", str(res),
                "--plots", str(plots), "--data", str(text), "--context", "200", "--window", "20",
                "--docs", "3", "--budgets", "0.2,0.5", "--mode-budgets", "0.2", "--bits", "32",
                "--chunk", "4", "--task-haystacks", "3", "--task-context", "1200", "--device", device,
                "--no-progress"]

    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the launched processes run with OMP_NUM_THREADS=1
    try:
        assert main(train_args(one, tmp_path / "one_train.json")) == 0
        assert main(eval_args(one, tmp_path / "one_eval.json", tmp_path / "one_plots")) == 0
    finally:
        torch.set_num_threads(threads)

    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(driver),
           *train_args(two, tmp_path / "two_train.json"), "--then",
           *eval_args(one, tmp_path / "two_eval.json", tmp_path / "two_plots")]
    proc = subprocess.run(cmd, env=env, timeout=240, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    # train-hash: layers 0, 2 on rank 0 and layer 1 on rank 1; rank 0 wrote the result
    a, b = HashWeights.load(one), HashWeights.load(two)
    assert b.trained
    for i in range(3):
        torch.testing.assert_close(a.layer(i), b.layer(i), rtol=1e-5, atol=1e-6)
    stats = json.loads((tmp_path / "two_train.json").read_text())
    assert [s["layers_trained"] for s in stats["ranks"]] == [[0, 2], [1]]
    assert [s["device"] for s in stats["ranks"]] == (["cpu", "cpu"] if device == "cpu" else ["cuda:0", "cuda:1"])
    assert (tmp_path / "two.safetensors.ckpt" / "layer_001.safetensors").is_file()

    # eval: documents 0, 2 and haystacks 0, 2 on rank 0, the rest on rank 1; same numbers
    r1 = json.loads((tmp_path / "one_eval.json").read_text())
    r2 = json.loads((tmp_path / "two_eval.json").read_text())
    assert (r1["processes"], r2["processes"]) == (1, 2)
    assert r2["setup"]["positions"] == 60 and r2["tasks"]["dense"]["overall"]["n"] == 18
    assert {"fidelity", "nll", "tasks"} <= set(r2)
    assert _without_timing(r2) == _without_timing(r1)
    assert (tmp_path / "two_plots" / "report.md").read_text() == (tmp_path / "one_plots" / "report.md").read_text()
