"""Masked-LM fine-tuning models that run the MLM head only where there are labels.

`BertForMaskedLMMaskedPositions` and `RobertaForMaskedLMMaskedPositions` are drop-ins for
`transformers.BertForMaskedLM` / `RobertaForMaskedLM`: same modules, same parameter names, same state
dict, and their checkpoints are plain upstream checkpoints (`config.architectures` names the upstream
class), so `AutoModelForMaskedLM.from_pretrained` loads them without this package.

What differs is opt-in:
- `config.max_num_masked_tokens = K` with labels given: the K labelled positions of each row are gathered
  from the encoder output (`gather_masked_positions`) and only those go through the head transform and the
  [H, V] decoder. The loss equals the full-sequence loss as long as no row has more than K labels, which
  the max-tokens masking collator guarantees.
- `parallelize(ipu_config)`: activation recomputation per layer and a `ChunkedVocabProjection` decoder when
  the IPU config asks for embedding/projection serialisation; `deparallelize()` undoes both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import BertForMaskedLM, RobertaForMaskedLM
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.roberta.modeling_roberta import gelu as roberta_gelu
from transformers.utils.generic import can_return_tuple

from .layers import (
    SaveAsUpstreamMixin,
    count_overflowing_rows,
    gather_masked_positions,
    num_projection_chunks,
    set_projection_chunks,
    set_recomputation,
    vocab_projection_loss,
)


logger = logging.getLogger(__name__)


@dataclass
class MaskedPositionsMaskedLMOutput(MaskedLMOutput):
    """`MaskedLMOutput` plus the labels aligned with `logits`.

    logits: [B, K, V] at the gathered positions when `config.max_num_masked_tokens` is set and labels are
        given, else [B, S, V] like upstream. In training mode only `loss` is set.
    masked_lm_labels: [B, K] gathered labels (-100 on filler positions) or the [B, S] labels, so metrics can
        score accuracy without knowing which variant produced the logits.
    """

    masked_lm_labels: torch.Tensor | None = None


class MaskedPositionsMaskedLMMixin(SaveAsUpstreamMixin):
    """The masked-position forward and `parallelize`, shared by the MLM classes; saves as `upstream_class`.

    A subclass names its upstream class and says where its head transform and decoder live; the encoder is
    the upstream `base_model_prefix` attribute.
    """

    base_model_prefix: str

    def _head_transform(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The head's layers before the vocabulary projection."""
        raise NotImplementedError

    def _decoder_owner(self) -> nn.Module:
        """The module holding the vocabulary projection as its `decoder` attribute."""
        raise NotImplementedError

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
        **kwargs: Any,
    ) -> MaskedPositionsMaskedLMOutput:
        """Same inputs as the upstream masked-LM forward; see the module docstring for what differs."""
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
        sequence_output = outputs.last_hidden_state
        masked_lm_labels = labels
        num_masked = getattr(self.config, "max_num_masked_tokens", None)
        if labels is not None and num_masked:
            self._warn_on_label_overflow(labels, num_masked)
            sequence_output, masked_lm_labels, _ = gather_masked_positions(sequence_output, labels, num_masked)

        only_loss = self.training and labels is not None
        loss, logits = vocab_projection_loss(
            self._head_transform(sequence_output),
            masked_lm_labels,
            self._decoder_owner().decoder,
            return_logits=not only_loss,
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

    def _warn_on_label_overflow(self, labels: torch.Tensor, num_masked: int) -> None:
        # One host sync per batch until the user has been told; skipped while torch.compile traces.
        if getattr(self, "_warned_label_overflow", False) or torch.compiler.is_compiling():
            return
        overflowing = count_overflowing_rows(labels, num_masked)
        if overflowing:
            self._warned_label_overflow = True
            logger.warning(
                "%d row(s) carry more than max_num_masked_tokens=%d labels; the extra labels are left out of the "
                "MLM loss. Mask with DataCollatorForLanguageModelingWithMaxTokensMasked or raise "
                "config.max_num_masked_tokens.", overflowing, num_masked,
            )

    def parallelize(self, ipu_config: Any):
        """Apply the training-speed settings of `ipu_config` as explicit module changes.

        - `recompute_checkpoint_every_layer`: activation checkpointing around every encoder layer.
        - the larger of `embedding_serialization_factor` / `projection_serialization_factor`, n > 1: the
          decoder becomes a `ChunkedVocabProjection` computing the training loss in n chunks, on the same
          Parameters (tying and state-dict keys unchanged).
        """
        set_recomputation(self, bool(getattr(ipu_config, "recompute_checkpoint_every_layer", False)))
        set_projection_chunks(self._decoder_owner(), "decoder", num_projection_chunks(ipu_config))
        return self

    def deparallelize(self):
        """Undo `parallelize`: no recomputation and a plain `nn.Linear` decoder on the same weights."""
        set_recomputation(self, False)
        set_projection_chunks(self._decoder_owner(), "decoder", 1)
        return self


class BertForMaskedLMMaskedPositions(MaskedPositionsMaskedLMMixin, BertForMaskedLM):
    """`BertForMaskedLM` with the MLM head run only at the labelled positions (see the module docstring)."""

    upstream_class = BertForMaskedLM

    def _head_transform(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions.transform(hidden_states)

    def _decoder_owner(self) -> nn.Module:
        return self.cls.predictions


class RobertaForMaskedLMMaskedPositions(MaskedPositionsMaskedLMMixin, RobertaForMaskedLM):
    """`RobertaForMaskedLM` with the MLM head run only at the labelled positions (see the module docstring)."""

    upstream_class = RobertaForMaskedLM

    def _head_transform(self, hidden_states: torch.Tensor) -> torch.Tensor:
        head = self.lm_head
        return head.layer_norm(roberta_gelu(head.dense(hidden_states)))

    def _decoder_owner(self) -> nn.Module:
        return self.lm_head
