"""BERT pretraining with the MLM head evaluated only at the masked positions.

A drop-in for `transformers.BertForPreTraining`: same modules, same parameter names, same state dict,
and checkpoints saved from it are plain `BertForPreTraining` checkpoints. The speed-ups are opt-in:
`config.max_num_masked_tokens` turns on the masked-position head, and `parallelize(ipu_config)`
swaps in activation recomputation and the chunked vocabulary projection (`deparallelize()` undoes it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForPreTraining
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .layers import (
    SaveAsUpstreamMixin,
    count_overflowing_rows,
    gather_masked_positions,
    num_projection_chunks,
    pack_labelled_positions,
    set_projection_chunks,
    set_recomputation,
    trunc_normal_init_,
    vocab_projection_loss,
)


logger = logging.getLogger(__name__)

# Forwards between two checks for rows with more labels than max_num_masked_tokens (each check syncs the host).
OVERFLOW_CHECK_INTERVAL = 100


@dataclass
class MaskedPositionsPreTrainingOutput(ModelOutput):
    """Output of `BertForPreTrainingMaskedPositions`.

    loss: mlm_loss + nsp_loss (whichever were computed); the only field set in training mode.
    prediction_logits: [B, K, V] at the gathered positions when `config.max_num_masked_tokens` is set,
        else [B, S, V] like upstream.
    seq_relationship_logits: [B, 2].
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


class BertForPreTrainingMaskedPositions(SaveAsUpstreamMixin, BertForPreTraining):
    """`BertForPreTraining` that runs the MLM head only where there are labels.

    With `config.max_num_masked_tokens = K` and labels given, the K positions of each row that carry
    labels (top-k of `labels != -100`) are gathered from the encoder output and only those [B, K, H]
    states go through the prediction-head transform and the [H, V] decoder, instead of all S positions.
    The MLM loss is the mean cross-entropy over the gathered labels, which equals the full-sequence loss
    as long as no row has more than K labels (the masking collator guarantees this); a row with more
    is reported once with a warning. Without K the model computes full-sequence logits like upstream.

    A training step on the CPU (eager) packs exactly the labelled positions of the whole batch instead,
    [M, H] with M the number of labels, which skips the fillers and gives the same loss without a cap.

    In training mode the output carries only the loss, so the logits can be freed early (and, with
    the chunked projection, are never materialised at all).
    """

    upstream_class = BertForPreTraining

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._warned_label_overflow = False
        self._forwards_since_overflow_check = -1

    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal init (±2 std, std = `initializer_range`) for Linear and Embedding weights.

        Everything else (LayerNorm weight 1 / bias 0, the MLM output bias, the embedding buffers) is
        upstream's init. The `transformers.initialization` helpers skip parameters that
        `from_pretrained` loaded, so this only ever touches freshly created weights.
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            trunc_normal_init_(module.weight, std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            trunc_normal_init_(module.weight, std)
            # Checked here because slicing the row loses the "already loaded" flag that init.* checks.
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        else:
            super()._init_weights(module)

    @torch.no_grad()
    @init.guard_torch_init_functions()
    def initialize_weights(self) -> None:
        """Run `_init_weights` on every module, the `bert` sub-model included.

        Upstream hands each `PreTrainedModel` child to its own `_init_weights`, and the `BertModel` encoder
        already ran its plain-normal init (and marked its modules done) while it was built inside our
        `__init__`, so the truncated normal would never reach the encoder. Parameters loaded by
        `from_pretrained` carry a per-parameter flag that the `transformers.initialization` helpers honour,
        so ignoring the per-module flag here does not overwrite loaded weights.
        """
        for module in self.modules():
            self._init_weights(module)
            module._is_hf_initialized = True

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
        **kwargs: Any,
    ) -> MaskedPositionsPreTrainingOutput:
        """Same inputs as `BertForPreTraining.forward`; see the class docstring for what differs."""
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        sequence_output = outputs.last_hidden_state
        masked_lm_labels = labels

        only_loss = self.training and (labels is not None or next_sentence_label is not None)
        num_masked = getattr(self.config, "max_num_masked_tokens", None)
        if labels is not None and num_masked:
            if only_loss and self._packs_masked_positions(sequence_output):
                sequence_output, masked_lm_labels = pack_labelled_positions(sequence_output, labels)
            else:
                self._warn_on_label_overflow(labels, num_masked)
                sequence_output, masked_lm_labels, _ = gather_masked_positions(sequence_output, labels, num_masked)

        predictions = self.cls.predictions
        mlm_loss, prediction_logits = vocab_projection_loss(
            predictions.transform(sequence_output),
            masked_lm_labels,
            predictions.decoder,
            return_logits=not (only_loss and labels is not None),
        )

        seq_relationship_logits = self.cls.seq_relationship(outputs.pooler_output)
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
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @staticmethod
    def _packs_masked_positions(sequence_output: torch.Tensor) -> bool:
        """Whether a training step packs the labelled positions (`pack_labelled_positions`) instead of
        gathering a fixed K per row: on the CPU in eager mode, where dynamic shapes cost nothing and the
        K - labels fillers (~40% of K at 15% masking) would go through the [H, V] projection for nothing.
        Accelerators and compiled graphs keep the static K: there the boolean index would sync the host
        and break the graph, for a projection that is a few percent of the step."""
        return sequence_output.device.type == "cpu" and not torch.compiler.is_compiling()

    def _warn_on_label_overflow(self, labels: torch.Tensor, num_masked: int) -> None:
        # The check costs a host sync on accelerators, so it runs on the first forward and then every
        # OVERFLOW_CHECK_INTERVAL-th one, and stops once the user has been told; it is also skipped while
        # tracing for torch.compile, where a data-dependent branch would break the graph.
        if self._warned_label_overflow or torch.compiler.is_compiling():
            return
        self._forwards_since_overflow_check += 1
        if self._forwards_since_overflow_check % OVERFLOW_CHECK_INTERVAL:
            return
        overflowing = count_overflowing_rows(labels, num_masked)
        if overflowing:
            self._warned_label_overflow = True
            logger.warning(
                "%d row(s) carry more than max_num_masked_tokens=%d labels; the extra labels are left out of "
                "the MLM loss, which therefore differs from the full-sequence loss. Mask with "
                "DataCollatorForLanguageModelingWithMaxTokensMasked or raise config.max_num_masked_tokens.",
                overflowing,
                num_masked,
            )

    def parallelize(self, ipu_config: Any) -> BertForPreTrainingMaskedPositions:
        """Apply the training-speed settings of `ipu_config` as explicit module changes.

        - `recompute_checkpoint_every_layer`: activation checkpointing around every encoder layer.
        - `embedding_serialization_factor` / `projection_serialization_factor` (the larger one, n): when
          n > 1 the MLM decoder becomes a `ChunkedVocabProjection` computing the loss in n chunks. It keeps
          the decoder's Parameters and names, so tying and the state dict are unchanged.
        """
        set_recomputation(self, bool(getattr(ipu_config, "recompute_checkpoint_every_layer", False)))
        set_projection_chunks(self.cls.predictions, "decoder", num_projection_chunks(ipu_config))
        return self

    def deparallelize(self) -> BertForPreTrainingMaskedPositions:
        """Undo `parallelize`: no recomputation and a plain `nn.Linear` decoder on the same weights."""
        set_recomputation(self, False)
        set_projection_chunks(self.cls.predictions, "decoder", 1)
        return self
