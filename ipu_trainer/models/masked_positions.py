"""The masked-position MLM head, shared by the BERT pretraining model and the BERT/RoBERTa masked-LM models.

With `config.max_num_masked_tokens = K` and labels given, only the labelled positions go through the head
transform and the [H, V] vocabulary projection instead of all S positions of a row:

- accelerators, compiled graphs and evaluation gather a static K positions per row
  (`gather_masked_positions`, labelled ones first, -100 fillers). The loss equals the full-sequence loss as
  long as no row has more than K labels, which the max-tokens masking collator guarantees; a row with more
  is reported once (`LabelOverflowCheck`).
- a training step on the CPU in eager mode packs exactly the labelled positions of the batch
  (`pack_labelled_positions`): dynamic shapes cost nothing there, the fillers (~40% of K at 15% masking)
  are skipped, and the loss is the full-sequence loss whatever the row counts.

Without K the head runs on the full sequence, like upstream.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .layers import count_overflowing_rows, gather_masked_positions, pack_labelled_positions, vocab_projection_loss
from .parallelize import ParallelizeMixin


logger = logging.getLogger(__name__)

# Forwards between two checks for rows with more labels than max_num_masked_tokens (each check syncs the host).
OVERFLOW_CHECK_INTERVAL = 100


class LabelOverflowCheck:
    """Warns once when a row carries more labels than the gathered K, whose extra labels leave the loss.

    Counting the labels per row syncs the host with an accelerator, so the count is taken on the first
    call and then on every `interval`-th one, and never again once the user has been warned. It is also
    skipped while torch.compile traces, where a data-dependent branch would break the graph.
    """

    def __init__(self, interval: int = OVERFLOW_CHECK_INTERVAL) -> None:
        if interval < 1:
            raise ValueError(f"interval={interval!r} must be >= 1")
        self.interval = interval
        self.calls = 0
        self.warned = False

    def __call__(self, labels: torch.Tensor, num_positions: int) -> None:
        if self.warned or torch.compiler.is_compiling():
            return
        due = self.calls % self.interval == 0
        self.calls += 1
        if not due:
            return
        overflowing = count_overflowing_rows(labels, num_positions)
        if overflowing:
            self.warned = True
            logger.warning(
                "%d row(s) carry more than max_num_masked_tokens=%d labels; the extra labels are left out of "
                "the MLM loss, which therefore differs from the full-sequence loss. Mask with "
                "DataCollatorForLanguageModelingWithMaxTokensMasked or raise config.max_num_masked_tokens.",
                overflowing,
                num_positions,
            )


class MaskedPositionsHeadMixin(ParallelizeMixin):
    """The masked-position MLM head for a model whose head is "transform, then vocabulary projection".

    A subclass says what its head transform is (`_head_transform`) and where its vocabulary projection
    lives (`vocab_projection_site`, which `parallelize` uses too); its forward runs the encoder and hands
    the sequence output to `_masked_lm_head`.

    `static_masked_positions = True` makes CPU training gather the static K per row as accelerators do,
    instead of packing the labelled positions (same loss; for A/B measurements and tests).
    """

    static_masked_positions: bool = False

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._label_overflow_check = LabelOverflowCheck()

    def _head_transform(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The head's layers before the vocabulary projection."""
        raise NotImplementedError

    def _packs_masked_positions(self, sequence_output: torch.Tensor) -> bool:
        """Whether a training step packs the labelled positions instead of gathering a static K per row: on
        the CPU in eager mode. Accelerators and compiled graphs keep the static K: there the boolean index
        would sync the host and break the graph, for a projection that is a few percent of the step."""
        return (
            not self.static_masked_positions
            and sequence_output.device.type == "cpu"
            and not torch.compiler.is_compiling()
        )

    def _masked_lm_head(
        self, sequence_output: torch.Tensor, labels: torch.Tensor | None, return_logits: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """MLM loss and logits from the encoder output [B, S, H]; see the module docstring.

        Returns `(loss, logits, masked_lm_labels)`: `loss` is None without labels, `logits` is None when not
        `return_logits` and the projection is chunked, and `masked_lm_labels` are the labels aligned with the
        logits ([B, K] gathered with -100 fillers, [M] packed, or the given [B, S] labels).
        """
        masked_lm_labels = labels
        num_positions = getattr(self.config, "max_num_masked_tokens", None)
        if labels is not None and num_positions:
            if not return_logits and self._packs_masked_positions(sequence_output):
                sequence_output, masked_lm_labels = pack_labelled_positions(sequence_output, labels)
            else:
                self._label_overflow_check(labels, num_positions)
                sequence_output, masked_lm_labels, _ = gather_masked_positions(sequence_output, labels, num_positions)
        loss, logits = vocab_projection_loss(
            self._head_transform(sequence_output), masked_lm_labels, self.vocab_projection, return_logits=return_logits
        )
        return loss, logits, masked_lm_labels
