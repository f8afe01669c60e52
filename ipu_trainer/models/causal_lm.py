"""GPT-2 causal-LM training with the IPU config's recomputation and chunked vocabulary projection.

`GPT2LMHeadModelChunked` is a drop-in for `transformers.GPT2LMHeadModel`: same modules and state dict,
and it saves as a plain `GPT2LMHeadModel` checkpoint. `parallelize(ipu_config)` turns on activation
recomputation and, with an embedding/projection serialisation factor n > 1, computes the training loss
through a `ChunkedVocabProjection` so only 1/n of the [tokens, vocab] logits exists at a time. The LM head
stays tied to the token embedding: the chunked projection holds the very same weight Parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from .layers import ChunkedVocabProjection
from .parallelize import ParallelizeMixin


class GPT2LMHeadModelChunked(ParallelizeMixin, GPT2LMHeadModel):
    """`GPT2LMHeadModel` whose training loss can run through a chunked, tied vocabulary projection.

    Only training with labels and a chunked head takes the chunked path, which returns the loss alone:
    the mean cross-entropy of each position's prediction of the next token (labels shifted by one, -100
    ignored), the same number upstream computes from the full logits. Everything else is upstream's forward.
    """

    upstream_class = GPT2LMHeadModel

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithCrossAttentions:
        if not (self.training and labels is not None and isinstance(self.lm_head, ChunkedVocabProjection)):
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels, **kwargs,
            )
        hidden_states = self.transformer(
            input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=False,
        ).last_hidden_state
        loss = self.lm_head.loss(hidden_states[:, :-1], labels[:, 1:].to(hidden_states.device))
        return CausalLMOutputWithCrossAttentions(loss=loss)

    def vocab_projection_site(self) -> tuple[nn.Module, str]:
        return self, "lm_head"
