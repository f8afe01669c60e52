"""Masked-LM fine-tuning models that run the MLM head only where there are labels.

`BertForMaskedLMMaskedPositions` and `RobertaForMaskedLMMaskedPositions` are drop-ins for
`transformers.BertForMaskedLM` / `RobertaForMaskedLM`: same modules, same parameter names, same state
dict, and their checkpoints are plain upstream checkpoints (`config.architectures` names the upstream
class), so `AutoModelForMaskedLM.from_pretrained` loads them without this package.

What differs is opt-in:
- `config.max_num_masked_tokens = K` with labels given: only the labelled positions go through the head
  transform and the [H, V] decoder (`ipu_trainer.models.masked_positions`, the head they share with
  BERT pretraining).
- `parallelize(ipu_config)`: activation recomputation per layer and a `ChunkedVocabProjection` decoder when
  the IPU config asks for embedding/projection serialisation; `deparallelize()` undoes both.
- packed rows (`ipu_trainer.data.packing`): `sequence_ids` [B, L] keep attention inside each sequence
  (`ipu_trainer.models.packed`) and `position_ids` count from 0 in every sequence; the MLM loss is the mean
  over the labelled tokens, as for the same sequences unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import BertForMaskedLM, RobertaForMaskedLM
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.roberta.modeling_roberta import gelu as roberta_gelu
from transformers.utils.generic import can_return_tuple

from .masked_positions import MaskedPositionsHeadMixin
from .packed import packed_attention_mask


@dataclass
class MaskedPositionsMaskedLMOutput(MaskedLMOutput):
    """`MaskedLMOutput` plus the labels aligned with `logits`.

    logits: [B, K, V] at the gathered positions when `config.max_num_masked_tokens` is set and labels are
        given, else [B, S, V] like upstream. In training mode only `loss` is set.
    masked_lm_labels: [B, K] gathered labels (-100 on filler positions) or the [B, S] labels, so metrics can
        score accuracy without knowing which variant produced the logits.
    """

    masked_lm_labels: torch.Tensor | None = None


class MaskedPositionsMaskedLMMixin(MaskedPositionsHeadMixin):
    """The masked-LM forward around the shared masked-position head; the encoder is the upstream
    `base_model_prefix` attribute. A subclass names its upstream class, head transform and decoder site."""

    base_model_prefix: str

    def _packed_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Packed rows count positions from 0 in every sequence; the embedding's own indices for them."""
        return position_ids

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sequence_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MaskedPositionsMaskedLMOutput:
        """Same inputs as the upstream masked-LM forward plus `sequence_ids` for packed rows; see the module
        docstring for what differs."""
        if sequence_ids is not None:
            attention_mask = packed_attention_mask(self.config, sequence_ids, position_ids, self.dtype)
            position_ids = self._packed_position_ids(position_ids)
        encoder = getattr(self, self.base_model_prefix)
        outputs = encoder(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            return_dict=True,
            **kwargs,
        )
        only_loss = self.training and labels is not None
        loss, logits, masked_lm_labels = self._masked_lm_head(
            outputs.last_hidden_state, labels, return_logits=not only_loss
        )
        if only_loss:
            return MaskedPositionsMaskedLMOutput(loss=loss)
        return MaskedPositionsMaskedLMOutput(
            loss=loss,
            logits=logits,
            masked_lm_labels=masked_lm_labels,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class BertForMaskedLMMaskedPositions(MaskedPositionsMaskedLMMixin, BertForMaskedLM):
    """`BertForMaskedLM` with the MLM head run only at the labelled positions (see the module docstring)."""

    upstream_class = BertForMaskedLM

    def _head_transform(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions.transform(hidden_states)

    def vocab_projection_site(self) -> tuple[nn.Module, str]:
        return self.cls.predictions, "decoder"


class RobertaForMaskedLMMaskedPositions(MaskedPositionsMaskedLMMixin, RobertaForMaskedLM):
    """`RobertaForMaskedLM` with the MLM head run only at the labelled positions (see the module docstring)."""

    upstream_class = RobertaForMaskedLM

    def _packed_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        # RoBERTa numbers real tokens from padding_idx + 1 (its embeddings reserve the rows below).
        return position_ids + self.roberta.embeddings.padding_idx + 1

    def _head_transform(self, hidden_states: torch.Tensor) -> torch.Tensor:
        head = self.lm_head
        return head.layer_norm(roberta_gelu(head.dense(hidden_states)))

    def vocab_projection_site(self) -> tuple[nn.Module, str]:
        return self.lm_head, "decoder"
