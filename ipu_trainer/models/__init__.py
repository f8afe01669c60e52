"""Training-speed variants of transformers models that save as the plain upstream classes."""

from __future__ import annotations

from typing import Any

from .bert import BertForPreTrainingMaskedPositions, MaskedPositionsPreTrainingOutput
from .layers import ChunkedVocabProjection, gather_masked_positions, trunc_normal_init_, vocab_projection_loss


# model_type -> class computing the MLM head only at the masked positions; other families join here.
_MASKED_POSITIONS_MODELS: dict[str, type] = {
    "bert": BertForPreTrainingMaskedPositions,
}


def masked_positions_model_for(config: Any) -> type | None:
    """The masked-position pretraining class for `config`'s model type, or None if there is none."""
    return _MASKED_POSITIONS_MODELS.get(getattr(config, "model_type", None))


__all__ = [
    "BertForPreTrainingMaskedPositions",
    "ChunkedVocabProjection",
    "MaskedPositionsPreTrainingOutput",
    "gather_masked_positions",
    "masked_positions_model_for",
    "trunc_normal_init_",
    "vocab_projection_loss",
]
