"""A model cut into pipeline stages as `layers_per_ipu` says, for `torch.distributed.pipelining`.

Stage k of n holds layers `sum(layers[:k])` to `sum(layers[:k+1])` of the model's transformer stack; the first stage
also holds the embeddings, the last one the final norm and the heads (so an entry of 0 gives a stage with only the
embeddings, as `[0, 4, 4, 4]` did on the IPU). The stage modules hold the model's own submodules, not copies: a
parameter's name inside a stage is its path below the stage (`layer.0.attention...`), and the model keeps every
parameter under its usual name, so the model saves as the plain transformers checkpoint it is.

Between stages only the hidden states travel (the activations `PipelineStage` sends); what else a stage needs from the
micro-batch (the attention mask, the labels for the heads) is given to each stage by its own process, which holds the
whole micro-batch (see `ipu_trainer.training.pipeline`). `stage_inputs` says which inputs each stage takes.

Supported: the package's BERT pretraining and masked-LM classes (BERT, RoBERTa) and GPT-2 causal LM, the classes the
scripts build (`PIPELINED_CLASSES`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from .bert import BertForPreTrainingMaskedPositions
from .causal_lm import GPT2LMHeadModelChunked
from .layers import ChunkedVocabProjection
from .masked_lm import MaskedPositionsMaskedLMMixin, MaskedPositionsMaskedLMOutput

PIPELINED_CLASSES = (BertForPreTrainingMaskedPositions, MaskedPositionsMaskedLMMixin, GPT2LMHeadModelChunked)


def layer_ranges(layers_per_stage: list[int]) -> list[tuple[int, int]]:
    """[2, 2] -> [(0, 2), (2, 4)]: the layers of each stage as a half-open range."""
    ranges, start = [], 0
    for count in layers_per_stage:
        ranges.append((start, start + count))
        start += count
    return ranges


class _Stage(nn.Module):
    """One stage of a pipelined model. `forward` takes the input ids (first stage) or the previous stage's hidden
    states, and keyword inputs from `stage_inputs`; it returns hidden states, or on the last stage the model's output
    (in training: its loss alone, the value the schedule back-propagates)."""

    def __init__(self, model: nn.Module, index: int, num_stages: int, layer_range: tuple[int, int]) -> None:
        super().__init__()
        self.index, self.num_stages = index, num_stages
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        object.__setattr__(self, "model", model)  # the whole model, not registered: its parameters are not all ours

    def stage_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """The positional inputs (first stage only: the input ids) and keyword inputs of this stage for `batch`."""
        args = (batch["input_ids"],) if self.is_first else ()
        wanted = set(self.keyword_inputs())
        return args, {name: value for name, value in batch.items() if name in wanted and value is not None}

    def keyword_inputs(self) -> tuple[str, ...]:
        raise NotImplementedError


class EncoderStage(_Stage):
    """A stage of a BERT-style encoder with the package's masked-position heads (pretraining or masked LM)."""

    def __init__(self, model: nn.Module, index: int, num_stages: int, layer_range: tuple[int, int]) -> None:
        super().__init__(model, index, num_stages, layer_range)
        base = model.base_model
        if self.is_first:
            self.embeddings = base.embeddings
        self.layer = nn.ModuleList(base.encoder.layer[layer_range[0] : layer_range[1]])
        if self.is_last:
            if isinstance(model, BertForPreTrainingMaskedPositions):
                self.pooler = base.pooler
            for name, child in model.named_children():
                if child is not base:
                    self.add_module(name, child)  # the heads (cls / lm_head), under the model's own names

    def keyword_inputs(self) -> tuple[str, ...]:
        names = ("attention_mask",)
        if self.is_first:
            names += ("token_type_ids", "position_ids")
        if self.is_last:
            names += ("labels", "next_sentence_label")
        return names

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, next_sentence_label: torch.Tensor | None = None) -> Any:
        if self.is_first:
            hidden_states = self.embeddings(input_ids=hidden_states, token_type_ids=token_type_ids,
                                            position_ids=position_ids)
        mask = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden_states,
                                         attention_mask=attention_mask)
        for layer in self.layer:
            hidden_states = layer(hidden_states, mask)
        if not self.is_last:
            return hidden_states
        model = self.model
        if isinstance(model, BertForPreTrainingMaskedPositions):
            output = model.pretraining_heads(hidden_states, labels, next_sentence_label)
        else:
            only_loss = model.training and labels is not None
            loss, logits, masked_lm_labels = model._masked_lm_head(hidden_states, labels, return_logits=not only_loss)
            output = MaskedPositionsMaskedLMOutput(loss=loss, logits=logits, masked_lm_labels=masked_lm_labels)
        return output.loss if model.training else output


class DecoderStage(_Stage):
    """A stage of GPT-2 (`GPT2LMHeadModelChunked`): token and position embeddings first, `ln_f` and the tied LM head
    last."""

    def __init__(self, model: nn.Module, index: int, num_stages: int, layer_range: tuple[int, int]) -> None:
        super().__init__(model, index, num_stages, layer_range)
        base = model.transformer
        if self.is_first:
            self.wte, self.wpe, self.drop = base.wte, base.wpe, base.drop
        self.h = nn.ModuleList(base.h[layer_range[0] : layer_range[1]])
        if self.is_last:
            self.ln_f, self.lm_head = base.ln_f, model.lm_head

    def keyword_inputs(self) -> tuple[str, ...]:
        return ("attention_mask", "labels") if self.is_last else ("attention_mask",)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Any:
        if self.is_first:
            positions = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
            hidden_states = self.drop(self.wte(hidden_states) + self.wpe(positions))
        positions = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
        mask = create_causal_mask(config=self.model.config, inputs_embeds=hidden_states,
                                  attention_mask=attention_mask, cache=None, position_ids=positions)
        for block in self.h:
            hidden_states = block(hidden_states, None, mask, None, use_cache=False, position_ids=positions)
        if not self.is_last:
            return hidden_states
        model = self.model
        hidden_states = self.ln_f(hidden_states)
        if model.training and labels is not None and isinstance(self.lm_head, ChunkedVocabProjection):
            return self.lm_head.loss(hidden_states[:, :-1], labels[:, 1:])  # as GPT2LMHeadModelChunked.forward
        logits = self.lm_head(hidden_states)
        loss = None if labels is None else model.loss_function(logits, labels, vocab_size=model.config.vocab_size)
        return loss if model.training else CausalLMOutputWithCrossAttentions(loss=loss, logits=logits)


def split_into_stages(model: nn.Module, layers_per_stage: list[int]) -> list[_Stage]:
    """Every stage of `model` for `layers_per_stage` (expanded: no -1), as modules sharing the model's parameters."""
    if not isinstance(model, PIPELINED_CLASSES):
        supported = ", ".join(cls.__name__ for cls in PIPELINED_CLASSES)
        raise ValueError(f"--pipeline cannot cut {type(model).__name__} into stages; supported: {supported} "
                         "(the BERT, RoBERTa and GPT-2 models the scripts build)")
    stage_class = DecoderStage if isinstance(model, GPT2LMHeadModelChunked) else EncoderStage
    ranges = layer_ranges(layers_per_stage)
    return [stage_class(model, index, len(ranges), layer_range) for index, layer_range in enumerate(ranges)]
