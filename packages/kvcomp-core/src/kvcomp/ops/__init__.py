"""The four decode-path ops of kvcomp. Each lives in its own folder:

    ops/<op>/reference.py   pure torch: the ground truth and the CPU path
    ops/<op>/kernels.py     @triton.jit bodies only
    ops/<op>/__init__.py    the public function: validates, then dispatches
                            (CUDA tensors -> Triton when available, else reference)

``kvcomp.ops`` never imports transformers.

``kvcomp.ops.hash_encode_split``: MLA's split code (latent and RoPE parts hashed with their
own projections, one code) in one launch.
``kvcomp.ops.append_kv``: a static cache's append of keys, values and key codes in one kernel.
``kvcomp.ops.rope_append``: a decode step's per-head q / k norms, RoPE, that append and the
query codes in one kernel (``KVCompStaticLayer.update_rotary``).

``kvcomp.ops.key_stats`` (``key_mean``, ``hash_bias``, ``key_norms``) computes what centred,
norm-weighted selection stores beside the codes: ``hash_encode(k, W, bias=hash_bias(mu, W))``
and ``hamming_topk(..., k_scale=key_norms(k, mu))``.

``kvcomp.ops.norm_act`` (``rms_norm``, ``add_rms_norm``, ``silu_mul``, ``rope``) and
``kvcomp.ops.gemv`` (decode-sized ``F.linear``, optionally with the residual add): a decoder
layer's norms, activation, rotary embedding and projections as one kernel each, for
``kvcomp.fusion.FusedDecode``.

Packed code layout (part of the API): a code of BITS bits is ``BITS // 32`` int32 words;
bit ``b`` is ``(x @ W)[..., b] > 0`` (``> bias[..., b]`` with a bias) and lives in word
``b // 32`` at bit ``b % 32`` (least significant bit first). A word with bit 31 set is a negative int32.
"""

from kvcomp.ops.append_kv import append_kv
from kvcomp.ops.gemv import gemv
from kvcomp.ops.hamming_topk import hamming_topk
from kvcomp.ops.hash_encode import hash_encode, hash_encode_split
from kvcomp.ops.key_stats import hash_bias, key_mean, key_norms
from kvcomp.ops.mla_decode import mla_decode
from kvcomp.ops.norm_act import add_rms_norm, rms_norm, rope, silu_mul
from kvcomp.ops.rope_append import rope_append
from kvcomp.ops.sparse_decode_attention import sparse_decode_attention
from kvcomp.ops.sparse_mla_decode import sparse_mla_decode

__all__ = [
    "hash_encode", "hash_encode_split", "hamming_topk", "sparse_decode_attention", "sparse_mla_decode", "mla_decode",
    "key_mean", "key_norms", "hash_bias", "rms_norm", "add_rms_norm", "silu_mul", "rope", "gemv",
    "append_kv", "rope_append",
]
