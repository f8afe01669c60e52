"""Model-agnostic building blocks for the fast language-modeling heads.

They only see hidden states, labels and a vocabulary projection, so any masked-LM head (BERT's
pretraining heads, `BertForMaskedLM`, `RobertaForMaskedLM`) can reuse them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config.ipu_config import IncompatibleIPUConfigError


# The label of a position that no loss counts (torch.nn.functional.cross_entropy's default ignore_index).
IGNORE_INDEX = -100


def gather_masked_positions(
    hidden_states: torch.Tensor, labels: torch.Tensor, num_positions: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick `num_positions` positions per row, labelled ones first, and gather them.

    `hidden_states` is [B, S, H] and `labels` [B, S] with -100 on unlabelled positions. The top-k of
    the "is labelled" indicator puts every labelled position (up to `num_positions`) in front of the
    unlabelled fillers, whose gathered labels stay -100 so a loss with `ignore_index=-100` skips them.
    A fixed K keeps shapes static, which is the point of the exercise on compiled backends.

    Returns the gathered hidden states [B, K, H], gathered labels [B, K] and positions [B, K] with
    K = min(num_positions, S).
    """
    num_positions = min(num_positions, labels.shape[1])
    # topk is not implemented for bool; float keeps it portable across devices.
    is_labelled = (labels != IGNORE_INDEX).to(torch.float32)
    positions = torch.topk(is_labelled, num_positions, dim=1, sorted=True).indices
    gathered_labels = torch.gather(labels, 1, positions)
    index = positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
    gathered_hidden = torch.gather(hidden_states, 1, index)
    return gathered_hidden, gathered_labels, positions


def pack_labelled_positions(hidden_states: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All labelled positions of the batch, packed: hidden states [M, H] and labels [M], M = labels in the batch.

    The dynamic-shape counterpart of `gather_masked_positions`: no fillers (with 15% masking a row of 128
    carries ~19 labels, so K = 32 gathers ~40% fillers through the [H, V] projection) and no per-row cap.
    The mean cross-entropy over the packed labels is the full-sequence MLM loss. The boolean index makes
    the shape data-dependent, which costs a host sync on accelerators and a graph break under compile.
    """
    selected = labels != IGNORE_INDEX
    return hidden_states[selected], labels[selected]


def count_overflowing_rows(labels: torch.Tensor, num_positions: int) -> int:
    """Rows carrying more labels than `num_positions`: their extra labels would be left out of the loss."""
    return int(((labels != IGNORE_INDEX).sum(dim=1) > num_positions).sum())


def _summed_cross_entropy(
    hidden_states: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    logits = F.linear(hidden_states, weight, bias)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


class ChunkedVocabProjection(nn.Module):
    """Drop-in replacement for a vocabulary projection `nn.Linear` that can compute its loss in chunks.

    The [tokens, vocab] logits are the largest activation of a masked-LM step. `loss()` splits the tokens
    into `num_chunks` pieces and wraps each piece's projection + cross-entropy in activation
    checkpointing, so only one chunk's logits exist at a time (forward and backward) and the peak memory
    drops by roughly the number of chunks, at the price of recomputing the projection once in backward.
    This plays the role of the IPU's embedding/projection serialisation factor.

    The module holds the *same* `weight` (usually tied to the word embeddings) and `bias` Parameters as
    the Linear it replaces, under the same attribute names, so state-dict keys and weight tying are
    unchanged. `forward()` is a plain projection, for when the logits themselves are needed.
    """

    def __init__(self, linear: nn.Linear, num_chunks: int) -> None:
        super().__init__()
        if num_chunks < 1:
            raise ValueError(f"num_chunks={num_chunks!r} must be >= 1")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.num_chunks = num_chunks

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight, self.bias)

    def loss(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the projected `hidden_states` [..., H] against `labels` [...] (-100 ignored)."""
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        labels = labels.reshape(-1)
        total = hidden_states.new_zeros((), dtype=torch.float32)
        for hidden_chunk, label_chunk in zip(
            hidden_states.chunk(self.num_chunks, dim=0), labels.chunk(self.num_chunks, dim=0)
        ):
            if torch.is_grad_enabled():
                total = total + checkpoint(
                    _summed_cross_entropy, hidden_chunk, label_chunk, self.weight, self.bias, use_reentrant=False
                )
            else:
                total = total + _summed_cross_entropy(hidden_chunk, label_chunk, self.weight, self.bias)
        # Dividing by the labelled count once reproduces `reduction="mean"` over all tokens exactly
        # (0/0 -> nan when nothing is labelled, as F.cross_entropy does).
        num_labelled = (labels != IGNORE_INDEX).sum()
        # Kept in float32: the loss feeds a loss scaler under half precision.
        return total / num_labelled

    def to_linear(self) -> nn.Linear:
        """An `nn.Linear` sharing this module's Parameters (the way back in `deparallelize`)."""
        # Built on the meta device so no throwaway [vocab, hidden] matrix is allocated before the swap.
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, num_chunks={self.num_chunks}"


def vocab_projection_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor | None,
    projection: nn.Module,
    return_logits: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Project `hidden_states` [..., H] to the vocabulary and compute the mean MLM cross-entropy.

    When the logits are not wanted and `projection` is a `ChunkedVocabProjection`, the loss is computed
    chunk by chunk without ever materialising the full logits. Returns `(loss, logits)`; `loss` is None
    without labels and `logits` is None when it was not materialised.
    """
    if labels is not None and not return_logits and isinstance(projection, ChunkedVocabProjection):
        return projection.loss(hidden_states, labels), None
    logits = projection(hidden_states)
    loss = None
    if labels is not None:
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
    return loss, logits


def num_projection_chunks(ipu_config: object) -> int:
    """How many chunks the vocabulary projection is computed in: the larger of the IPU config's
    `embedding_serialization_factor` and `projection_serialization_factor` (1 when unset)."""
    return max(
        getattr(ipu_config, "embedding_serialization_factor", None) or 1,
        getattr(ipu_config, "projection_serialization_factor", None) or 1,
    )


def set_projection_chunks(owner: nn.Module, name: str, num_chunks: int) -> None:
    """Make `owner.<name>` a `ChunkedVocabProjection` of `num_chunks` chunks, or a plain `nn.Linear` when
    `num_chunks` is 1, on the same Parameters either way (tying and state-dict keys are unchanged)."""
    projection = getattr(owner, name)
    if isinstance(projection, ChunkedVocabProjection):
        projection = projection.to_linear()
    setattr(owner, name, ChunkedVocabProjection(projection, num_chunks) if num_chunks > 1 else projection)


def set_recomputation(model: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing of every layer on or off (`recompute_checkpoint_every_layer`).

    transformers 5.24 calls it activation checkpointing and warns (FutureWarning) on every use of the
    gradient_checkpointing_* names; earlier 5.x releases only have those. The activation_checkpointing_*
    API is used wherever the class has it, so neither version warns. Non-reentrant checkpointing works with
    frozen inputs and `torch.compile`.
    """
    if enabled and not getattr(model, "supports_gradient_checkpointing", False):
        raise IncompatibleIPUConfigError(
            f"recompute_checkpoint_every_layer=true but {type(model).__name__} does not support activation "
            "checkpointing; set recompute_checkpoint_every_layer=false"
        )
    # Looked up on the class: reading a deprecated property on the instance is what warns.
    if hasattr(type(model), "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
