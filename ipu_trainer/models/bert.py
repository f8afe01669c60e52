"""BERT pretraining with the MLM head evaluated only at the masked positions.

A drop-in for `transformers.BertForPreTraining`: same modules, same parameter names, same state dict,
and checkpoints saved from it are plain `BertForPreTraining` checkpoints. The speed-ups are opt-in:
`config.max_num_masked_tokens` turns on the masked-position head, and `parallelize(ipu_config)`
swaps in activation recomputation and the chunked vocabulary projection (`deparallelize()` undoes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForPreTraining
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .masked_positions import MaskedPositionsHeadMixin
from .packed import packed_attention_mask, pool_sequence_starts


@dataclass
class MaskedPositionsPreTrainingOutput(ModelOutput):
    """Output of `BertForPreTrainingMaskedPositions`.

    loss: mlm_loss + nsp_loss (whichever were computed); the only field set in training mode.
    prediction_logits: [B, K, V] at the gathered positions when `config.max_num_masked_tokens` is set,
        else [B, S, V] like upstream.
    seq_relationship_logits: [B, 2], or [B, M, 2] for packed rows (one per sequence slot of `cls_positions`).
    masked_lm_labels: labels aligned with `prediction_logits` ([B, K] gathered, -100 on fillers), so
        metrics can score MLM accuracy without the full-sequence labels.
    mlm_loss, nsp_loss: the two parts of `loss`.
    """

    loss: torch.Tensor | None = None
    prediction_logits: torch.Tensor | None = None
    seq_relationship_logits: torch.Tensor | None = None
    masked_lm_labels: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class BertForPreTrainingMaskedPositions(MaskedPositionsHeadMixin, BertForPreTraining):
    """`BertForPreTraining` that runs the MLM head only where there are labels.

    With `config.max_num_masked_tokens = K` and labels given, the MLM head (prediction-head transform and
    [H, V] decoder) sees only the labelled positions: K gathered per row, or on CPU training exactly the
    labelled ones packed (see `ipu_trainer.models.masked_positions`). The MLM loss equals the
    full-sequence loss as long as no row has more than K labels (the masking collator guarantees this).
    Without K the model computes full-sequence logits like upstream.

    In training mode the output carries only the loss, so the logits can be freed early (and, with
    the chunked projection, are never materialised at all).

    Packed rows (`ipu_trainer.data.packing`): with `sequence_ids` [B, L] (and `position_ids` restarting at 0 in
    every sequence) attention stays inside each sequence (`ipu_trainer.models.packed`), and with
    `cls_positions` [B, M] the pooler and NSP head run at each sequence's [CLS], scored against
    `next_sentence_label` [B, M] (-100 on unused slots). The losses are those of the same sequences unpacked:
    MLM the mean over labelled tokens, NSP the mean over sequences.
    """

    upstream_class = BertForPreTraining

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        sequence_ids: torch.Tensor | None = None,
        cls_positions: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MaskedPositionsPreTrainingOutput:
        """Same inputs as `BertForPreTraining.forward` plus, for packed rows, `sequence_ids` and `cls_positions`;
        see the class docstring for what differs."""
        if sequence_ids is not None:
            if next_sentence_label is not None and cls_positions is None:
                raise ValueError("packed rows (sequence_ids) need cls_positions for the next-sentence head")
            attention_mask = packed_attention_mask(self.config, sequence_ids, position_ids, self.dtype)
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        return self.pretraining_heads(
            outputs.last_hidden_state, labels, next_sentence_label, cls_positions, outputs.pooler_output,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )

    def pretraining_heads(
        self,
        sequence_output: torch.Tensor,
        labels: torch.Tensor | None = None,
        next_sentence_label: torch.Tensor | None = None,
        cls_positions: torch.Tensor | None = None,
        pooler_output: torch.Tensor | None = None,
        hidden_states: tuple[torch.Tensor, ...] | None = None,
        attentions: tuple[torch.Tensor, ...] | None = None,
    ) -> MaskedPositionsPreTrainingOutput:
        """The pooler, both heads and the losses on the encoder output [B, S, H]: the part of `forward` after the
        encoder, also run on its own by the last stage of a pipeline (`ipu_trainer.models.stages`). `pooler_output`:
        the encoder's pooled [CLS] output when it has computed it already (else the pooler runs here)."""
        only_loss = self.training and (labels is not None or next_sentence_label is not None)
        mlm_loss, prediction_logits, masked_lm_labels = self._masked_lm_head(
            sequence_output, labels, return_logits=not (only_loss and labels is not None)
        )

        if cls_positions is None:
            if pooler_output is None:
                pooler_output = self.bert.pooler(sequence_output)
            seq_relationship_logits = self.cls.seq_relationship(pooler_output)
        else:
            pooled = pool_sequence_starts(self.bert.pooler, sequence_output, cls_positions)
            seq_relationship_logits = self.cls.seq_relationship(pooled).view(*cls_positions.shape, 2)
        nsp_loss = None
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(seq_relationship_logits.view(-1, 2).float(), next_sentence_label.view(-1))

        losses = [part for part in (mlm_loss, nsp_loss) if part is not None]
        loss = sum(losses[1:], losses[0]) if losses else None

        if only_loss:
            return MaskedPositionsPreTrainingOutput(loss=loss)
        return MaskedPositionsPreTrainingOutput(
            loss=loss,
            prediction_logits=prediction_logits,
            seq_relationship_logits=seq_relationship_logits,
            masked_lm_labels=masked_lm_labels,
            mlm_loss=mlm_loss,
            nsp_loss=nsp_loss,
            hidden_states=hidden_states,
            attentions=attentions,
        )

    def _head_transform(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.cls.predictions.transform(hidden_states)

    def vocab_projection_site(self) -> tuple[nn.Module, str]:
        return self.cls.predictions, "decoder"
