"""Hash training: collect post-RoPE queries and keys on real text, train one projection per
(layer, kv-head) with the HATA loss on token pairs (``objective="hata"``) or a ranking loss on
blocks (``objective="block-rank"``, for ``token_score="centered_norm"``), write a
``kvcomp.hashing.HashWeights`` (trained="1").

    from kvcomp.training import TrainConfig, train_hash_weights
    hw = train_hash_weights(model, [ids0, ids1, ...], TrainConfig(bits=128), out="W.safetensors")
"""

from kvcomp.training.block_rank import GroupSet, collect_groups, fit_block_rank
from kvcomp.training.collect import PairSet, capture_qk, collect_pairs, dense_labels
from kvcomp.training.loss import LossWeights, hata_loss
from kvcomp.training.trainer import ModelGeometry, TrainConfig, train_hash_weights

__all__ = [
    "GroupSet",
    "LossWeights",
    "ModelGeometry",
    "PairSet",
    "TrainConfig",
    "capture_qk",
    "collect_groups",
    "collect_pairs",
    "dense_labels",
    "fit_block_rank",
    "hata_loss",
    "train_hash_weights",
]
