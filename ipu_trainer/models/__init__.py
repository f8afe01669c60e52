"""Training-speed variants of transformers models that save as the plain upstream classes."""

from __future__ import annotations

from typing import Any

from .bert import BertForPreTrainingMaskedPositions, MaskedPositionsPreTrainingOutput
from .causal_lm import GPT2LMHeadModelChunked
from .layers import ChunkedVocabProjection, gather_masked_positions, vocab_projection_loss
from .masked_lm import BertForMaskedLMMaskedPositions, MaskedPositionsMaskedLMOutput, RobertaForMaskedLMMaskedPositions
from .masked_positions import MaskedPositionsHeadMixin
from .parallelize import ParallelizeMixin


# model_type -> class computing the MLM head only at the masked positions; other families join here.
_MASKED_POSITIONS_MODELS: dict[str, type] = {
    "bert": BertForPreTrainingMaskedPositions,
}


def masked_positions_model_for(config: Any) -> type | None:
    """The masked-position pretraining class for `config`'s model type, or None if there is none."""
    return _MASKED_POSITIONS_MODELS.get(getattr(config, "model_type", None))


# model_type -> masked-LM (fine-tuning) class with the masked-position head; others use AutoModelForMaskedLM.
_MASKED_LM_MODELS: dict[str, type] = {
    "bert": BertForMaskedLMMaskedPositions,
    "roberta": RobertaForMaskedLMMaskedPositions,
}


def masked_lm_model_for(config: Any) -> type | None:
    """The masked-position masked-LM class for `config`'s model type, or None if there is none."""
    return _MASKED_LM_MODELS.get(getattr(config, "model_type", None))


# model_type -> causal-LM class with parallelize(); others use AutoModelForCausalLM as they are.
_CAUSAL_LM_MODELS: dict[str, type] = {
    "gpt2": GPT2LMHeadModelChunked,
}


def causal_lm_model_for(config: Any) -> type | None:
    """The causal-LM class with `parallelize()` for `config`'s model type, or None if there is none."""
    return _CAUSAL_LM_MODELS.get(getattr(config, "model_type", None))


__all__ = [
    "BertForMaskedLMMaskedPositions",
    "BertForPreTrainingMaskedPositions",
    "ChunkedVocabProjection",
    "GPT2LMHeadModelChunked",
    "MaskedPositionsHeadMixin",
    "MaskedPositionsMaskedLMOutput",
    "MaskedPositionsPreTrainingOutput",
    "ParallelizeMixin",
    "RobertaForMaskedLMMaskedPositions",
    "causal_lm_model_for",
    "gather_masked_positions",
    "masked_lm_model_for",
    "masked_positions_model_for",
    "vocab_projection_loss",
]
