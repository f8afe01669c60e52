"""Model-side support for packed rows (several sequences in one row; see `ipu_trainer.data.packing`).

A packed row carries `sequence_ids` (1, 2, ... for its sequences, 0 on padding) and `position_ids` that
restart at 0 in every sequence. Attention must never cross sequences: every query attends only to the keys
of its own sequence, a block-diagonal mask built here from `sequence_ids`.

Which attention kernel. transformers 5's BERT and RoBERTa build their bidirectional mask from a 2-D padding
mask only; they do not derive sequence boundaries from `position_ids` (that is done for causal masks), so
packing needs an explicit mask. It is handed to the encoder as a ready 4-D additive mask [B, 1, L, L]
(0 = attend, the dtype's minimum = blocked), which transformers passes through untouched to the attention
function: SDPA (the default on CPUs and GPUs) adds it to the scores, and so do eager and flex attention.
On CUDA, SDPA with a mask runs the fused memory-efficient kernel (the flash kernel takes no mask); the
off-diagonal blocks are still computed and then blocked, which costs at most the attention-score share of
the FLOPs (about L / 6H of a layer: ~3% for BERT-base at 128, ~11% at 512). Variable-length flash attention
would skip those blocks, but it needs the separate flash-attn package and half precision; flash
implementations are refused with a clear error instead of silently mixing sequences. The CPU tests run the
very same mask through the very same SDPA call.

NSP: the pooler is applied to the hidden state at each sequence's [CLS] (`cls_positions`), giving one pooled
vector per sequence instead of one per row.
"""

from __future__ import annotations

import torch
from torch import nn


def block_diagonal_attention_mask(sequence_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask from `sequence_ids` [B, L]: 0 where query and key share a sequence id, the
    dtype's minimum elsewhere. Padding (id 0) attends only to padding, so no row of the mask is empty."""
    same_sequence = sequence_ids.unsqueeze(2) == sequence_ids.unsqueeze(1)
    mask = torch.zeros(same_sequence.shape, dtype=dtype, device=sequence_ids.device)
    return mask.masked_fill_(~same_sequence, torch.finfo(dtype).min).unsqueeze(1)


def pool_sequence_starts(pooler: nn.Module, sequence_output: torch.Tensor, cls_positions: torch.Tensor) -> torch.Tensor:
    """The pooler at each sequence's first token: `sequence_output` [B, L, H], `cls_positions` [B, M] -> [B*M, H].

    The pooler pools the first position of what it is given, so it gets the gathered [CLS] states as B*M
    one-token sequences.
    """
    hidden_size = sequence_output.shape[-1]
    index = cls_positions.unsqueeze(-1).expand(-1, -1, hidden_size)
    starts = torch.gather(sequence_output, 1, index)
    return pooler(starts.reshape(-1, 1, hidden_size))


def packed_attention_mask(
    config: object, sequence_ids: torch.Tensor, position_ids: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The encoder's attention mask for packed rows, after checking that the rows can be run as packed."""
    if position_ids is None:
        raise ValueError("packed rows (sequence_ids) need position_ids that restart at 0 in every sequence")
    check_packing_attention(config)
    return block_diagonal_attention_mask(sequence_ids, dtype)


# ---------------------------------------------------------------------------------------------------
# Private upstream touchpoint
# ---------------------------------------------------------------------------------------------------
# The attention implementation a model runs is only exposed as `config._attn_implementation`. It is read
# here alone, to refuse the flash implementations, which would ignore a 4-D mask. tests/test_packing.py
# fails by name if the attribute disappears.


def check_packing_attention(config: object) -> None:
    implementation = str(getattr(config, "_attn_implementation", None) or "")
    if "flash" in implementation:
        raise ValueError(
            f"packed rows need an attention that takes a block-diagonal mask, but the model runs "
            f"attn_implementation={implementation!r}; use sdpa (the default) or eager, or train without --packing"
        )

