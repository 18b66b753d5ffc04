"""HATA hash training: collect post-RoPE query/key pairs on real text, train one projection per
(layer, kv-head) with the HATA loss, write a ``kvcomp.hashing.HashWeights`` (trained="1").

    from kvcomp.training import TrainConfig, train_hash_weights
    hw = train_hash_weights(model, [ids0, ids1, ...], TrainConfig(bits=128), out="W.safetensors")
"""

from kvcomp.training.collect import PairSet, capture_qk, collect_pairs, dense_labels
from kvcomp.training.loss import LossWeights, hata_loss
from kvcomp.training.trainer import ModelGeometry, TrainConfig, train_hash_weights

__all__ = [
    "LossWeights",
    "ModelGeometry",
    "PairSet",
    "TrainConfig",
    "capture_qk",
    "collect_pairs",
    "dense_labels",
    "hata_loss",
    "train_hash_weights",
]
