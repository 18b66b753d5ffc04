"""Diagnose the offload tier on a GPU (issue 9): where does the offloaded step first differ from
the in-HBM one, and where does its time go.

For each (L, B): an 8-layer Qwen3-8B-shaped model, both caches filled with the same random rows
(kvcomp.bench.offload.fill), one lockstep decode step with every decoder layer's attention
output and selection captured; prints the first layer whose output / selection differs and
checks the offloaded layer's state against the in-HBM one (codes, host K/V, pool pages of the
selected blocks). Then a torch.profiler table of offloaded steps at the last (L, B).

    python tools/experiments/offload_debug.py [L:B ...]     (default 8192:1 8192:2 131072:1)
"""

from __future__ import annotations

import sys

import kvcomp
import torch
from kvcomp.bench.offload import (
    QWEN3_8B,
    TAIL,
    _cache_kw,
    _selections,
    _step,
    build_model,
    fill,
    kvcomp_config,
)
from kvcomp.offload import OffloadConfig


def capture(model):
    outs = {}
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, a, o, i=i: outs.__setitem__(i, o[0].detach().clone()))
        for i, layer in enumerate(model.model.layers)]
    return outs, hooks


def check(model, cfg, L, B, kw, dev, n):
    H, D = QWEN3_8B["num_key_value_heads"], QWEN3_8B["head_dim"]
    handle = kvcomp.enable(model, cfg)
    hbm = handle.new_cache(offload=None)
    off = handle.new_cache(offload=OffloadConfig(cache_blocks=32, reserve_tokens=L))
    L0 = L - TAIL
    fill(hbm, n, B, L0, H, D, dev, torch.bfloat16)
    fill(off, n, B, L0, H, D, dev, torch.bfloat16)
    tok = torch.randint(1, 1000, (B, 1), device=dev)
    for step in range(3):
        outs, hooks = capture(model)
        a = _step(model, hbm, tok, kw)
        oa = dict(outs)
        sa = _selections(hbm)
        outs.clear()
        b = _step(model, off, tok, kw)
        ob = dict(outs)
        sb = _selections(off)
        for h in hooks:
            h.remove()
        torch.cuda.synchronize()
        first = None
        for i in range(n):
            same_o = torch.equal(oa[i], ob[i])
            same_s = (i not in sa and i not in sb) or (i in sa and i in sb and torch.equal(sa[i], sb[i]))
            if not (same_o and same_s):
                first = i
                print(f"L={L} B={B} step {step}: layer {i} differs: output equal {same_o} "
                      f"(max diff {(oa[i].float() - ob[i].float()).abs().max().item():.4g}), selection equal {same_s}")
                if i in sa and i in sb and not torch.equal(sa[i], sb[i]):
                    d = (sa[i] != sb[i]).nonzero()
                    print("   selection differs at", d[:8].tolist(), "hbm", sa[i][tuple(d[0][:2])].tolist(),
                          "off", sb[i][tuple(d[0][:2])].tolist())
                lh, lo = hbm.layers[i], off.layers[i]
                m = lo.max_len
                if getattr(lo, "host_k", None) is not None:
                    print("   host K == hbm K:", torch.equal(lo.host_k[:, :, :m].to(dev), lh.keys_buf[:, :, :m]),
                          " host V == hbm V:", torch.equal(lo.host_v[:, :, :m].to(dev), lh.values_buf[:, :, :m]),
                          " codes equal:", torch.equal(lo.codes_buf[:, :, :m], lh.codes_buf[:, :, :m]),
                          " seq_lens", lh.seq_lens.tolist(), lo.seq_lens.tolist())
                    if i in sb:
                        sel = sb[i].reshape(B * H, -1)
                        tab = lo.blocks.table
                        bad = 0
                        for r in range(B * H):
                            for blk in sel[r].tolist():
                                if blk < 0:
                                    continue
                                s = int(tab[r, blk])
                                want = lh.keys_buf[r // H, r % H, blk * 128:(blk + 1) * 128]
                                got = lo.pool_k[s, 0, : want.shape[0]]
                                if s < 0 or not torch.equal(want, got):
                                    bad += 1
                                    if bad <= 3:
                                        print(f"   pool page wrong: row {r} block {blk} slot {s}",
                                              (want.float() - got.float()).abs().max().item() if s >= 0 else "")
                        print(f"   selected pages wrong: {bad} of {int((sel >= 0).sum())}")
                break
        if first is None:
            print(f"L={L} B={B} step {step}: every layer equal (logits equal {torch.equal(a, b)})")
        tok = a.argmax(-1, keepdim=True)
    return handle, off, tok


def main():
    pairs = [tuple(int(x) for x in s.split(":")) for s in sys.argv[1:]] or [(8192, 1), (8192, 2), (131072, 1)]
    dev = torch.device("cuda")
    n = 8
    model = build_model(QWEN3_8B, n, dev, torch.bfloat16)
    cfg = kvcomp_config(n, QWEN3_8B["head_dim"], 2048)
    kw = _cache_kw(model)
    for L, B in pairs:
        handle, off, tok = check(model, cfg, L, B, kw, dev, n)
        last = (handle, off, tok)
        if (L, B) != pairs[-1]:
            handle.disable()
            del off
            torch.cuda.empty_cache()
    handle, off, tok = last
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        tok = _step(model, off, tok, kw).argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            tok = _step(model, off, tok, kw).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
    print(ka.table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=60))


if __name__ == "__main__":
    main()
