"""Data collators for BERT-style pretraining."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling, default_data_collator

logger = logging.getLogger(__name__)


def max_num_masked_tokens(sequence_length: int, mlm_probability: float) -> int:
    """Per-sequence cap on masked tokens: the Binomial(L, p) mean plus two standard deviations.

    With L = `sequence_length` and p = `mlm_probability`: mean = L*p, std = sqrt(L*p*(1-p)) and
    cap = min(L, ceil((mean + 2*std) / 16) * 16). Rounding up to a multiple of 16 keeps the gathered
    MLM tensors nicely shaped; two standard deviations leave ~2% of rows to be trimmed. L=128, p=0.15 -> 32.
    """
    mean = sequence_length * mlm_probability
    std = math.sqrt(sequence_length * mlm_probability * (1 - mlm_probability))
    return min(sequence_length, math.ceil((mean + 2 * std) / 16) * 16)


def _max_seq_length_may_come_first(cls: type) -> type:
    """Let the dataclass take `max_seq_length` as its first positional argument, as optimum-graphcore's
    collator did (`Collator(128, tokenizer=tok)`), while a tokenizer first (`Collator(tok, ...)`, the
    upstream collator's order) keeps working: an integer first is the sequence length."""
    generated = cls.__init__

    @functools.wraps(generated)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            if "max_seq_length" in kwargs:
                raise TypeError(f"{cls.__name__} got max_seq_length both positionally and as a keyword")
            kwargs["max_seq_length"], args = args[0], args[1:]
        generated(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_max_seq_length_may_come_first
@dataclass
class DataCollatorForLanguageModelingWithMaxTokensMasked(DataCollatorForLanguageModeling):
    """MLM collator that never masks more than `max_num_masked_tokens` tokens in a sequence.

    `max_num_masked_tokens` is the per-sequence cap. Give the value that the model's
    `config.max_num_masked_tokens` also gets, so collator and model share one number. When None it is
    computed once, here, from `max_seq_length` and `mlm_probability` (the module function
    `max_num_masked_tokens(L, p)`) and stored on the attribute; with `max_seq_length` None as well, each
    batch's padded length is used as L and the attribute stays None.

    With `seed` set, each batch is masked by a generator seeded from the seed and the batch's token ids,
    never from the global RNG. The trainer's data loader collates one batch ahead of the step it runs,
    so masking from the global RNG would shift dropout's random stream and a run resumed from a
    checkpoint would diverge from the uninterrupted one; seeded by content, both mask alike, and so do
    DataLoader worker processes. The same rows in a different batch (another epoch's shuffle) get new masks.
    """

    max_seq_length: int | None = None
    max_num_masked_tokens: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        cap = self.max_num_masked_tokens
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(
                f"max_num_masked_tokens={cap!r} must be a whole number >= 1; pass None to derive it from "
                "max_seq_length and mlm_probability"
            )
        if cap is None and self.mlm and self.max_seq_length:
            # Inside a method the name resolves to the module-level function, not to this field.
            self.max_num_masked_tokens = max_num_masked_tokens(self.max_seq_length, self.mlm_probability)

    def torch_call(self, examples: list[Any]) -> dict[str, Any]:
        # Dynamic masking replaces any labels stored with the data, and ragged stored labels would make
        # the tokenizer's padding fail before masking even starts, so they are dropped on the way in.
        if examples and isinstance(examples[0], Mapping) and "labels" in examples[0]:
            examples = [{key: value for key, value in example.items() if key != "labels"} for example in examples]
        return super().torch_call(examples)

    def torch_mask_tokens(
        self, inputs: torch.Tensor, special_tokens_mask: Any | None = None, offset_mapping: Any | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask `inputs` [B, S] in place and return `(inputs, labels)`.

        1. Candidates: every token that is not special (incl. padding) is chosen independently with
           probability p = `mlm_probability` (Bernoulli), so a row of n candidates gets Binomial(n, p).
        2. Cap: with C = `self.max_num_masked_tokens` (when None, `max_num_masked_tokens(S, p)` of the batch's
           length S), rows with more than C chosen tokens keep a uniformly random subset of C of them: each
           chosen token draws a U(0, 1) score, unchosen ones score -1, and the top-C scores of the row survive.
           Vectorised over the batch; the cap binds on ~2% of rows.
        3. Corruption of the survivors: one U(0, 1) draw u per token; u < `mask_replace_prob` (0.8) ->
           [MASK], next `random_replace_prob` (0.1) -> a random vocabulary id, the rest (0.1) unchanged.
        4. labels = original id at the survivors, -100 everywhere else.
        """
        generator = _batch_generator(self.seed, inputs) if self.seed is not None else self.generator
        labels = inputs.clone()
        if special_tokens_mask is None:
            not_maskable = torch.isin(inputs, torch.tensor(self.tokenizer.all_special_ids, device=inputs.device))
        else:
            not_maskable = torch.as_tensor(special_tokens_mask, dtype=torch.bool, device=inputs.device)
        if self.tokenizer.pad_token_id is not None:
            not_maskable = not_maskable | (inputs == self.tokenizer.pad_token_id)

        probability = torch.full(inputs.shape, self.mlm_probability).masked_fill_(not_maskable, 0.0)
        chosen = torch.bernoulli(probability, generator=generator).bool()

        cap = self.max_num_masked_tokens
        if cap is None:
            cap = max_num_masked_tokens(inputs.shape[1], self.mlm_probability)
        if cap < inputs.shape[1]:
            scores = torch.rand(inputs.shape, generator=generator).masked_fill_(~chosen, -1.0)
            kept = torch.zeros_like(chosen).scatter_(1, scores.topk(cap, dim=1).indices, True)
            chosen &= kept

        labels[~chosen] = -100
        draw = torch.rand(inputs.shape, generator=generator)
        to_mask = chosen & (draw < self.mask_replace_prob)
        to_random = chosen & ~to_mask & (draw < self.mask_replace_prob + self.random_replace_prob)
        inputs[to_mask] = self.tokenizer.mask_token_id
        random_ids = torch.randint(len(self.tokenizer), inputs.shape, dtype=inputs.dtype, generator=generator)
        inputs[to_random] = random_ids[to_random]
        return inputs, labels


def _batch_generator(seed: int, inputs: torch.Tensor) -> torch.Generator:
    digest = hashlib.blake2b(inputs.cpu().numpy().tobytes(), digest_size=8, key=str(seed).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class _BatchAxisPadder:
    # A class rather than a closure so DataLoader workers started with "spawn" can pickle it.
    def __init__(self, batch_size: int, data_collator: Callable[[list[Any]], Any] | None = None) -> None:
        self.batch_size = batch_size
        self.data_collator = data_collator or default_data_collator
        self.wraps_default = data_collator is None

    def __call__(self, examples: Sequence[Any] | Callable) -> Any:
        if self.wraps_default and callable(examples) and not isinstance(examples, Sequence):
            # pad_on_batch_axis(batch_size)(collator): the decorator form of optimum-graphcore code.
            return _BatchAxisPadder(self.batch_size, examples)
        examples = list(examples)
        if 0 < len(examples) < self.batch_size:
            examples = [examples[i % len(examples)] for i in range(self.batch_size)]
        return self.data_collator(examples)


def _unchanged(data_collator: Callable) -> Callable:
    return data_collator


def pad_on_batch_axis(batch_size: int, data_collator: Callable | Mapping | None = None) -> Callable:
    """Wrap `data_collator` so every batch has exactly `batch_size` rows.

    A short (usually the last) batch is filled up by repeating its examples cyclically before collating.
    On the IPU this kept one compiled program for every step without `drop_last`; on GPU it keeps one
    shape for compiled graphs and a constant per-step sample count. Repeated samples are real data, so
    they weigh in the loss like any other. `data_collator` defaults to `transformers.default_data_collator`.

    Code written for optimum-graphcore calls it as a decorator, `pad_on_batch_axis(batch_size)(collator)`:
    the padder returned without a collator wraps a collator it is called with. That project's pretraining
    example also passed a dict of pad values as a second argument, which its own function did not take;
    it does so only under `--pad_on_batch_axis`, where `IPUTrainer` already pads every batch to the
    size each process takes, so with a dict the collator is returned unchanged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    if isinstance(data_collator, Mapping):
        logger.info("pad_on_batch_axis(batch_size, pad values): IPUTrainer pads the batches (--pad_on_batch_axis); "
                    "the collator is left as it is")
        return _unchanged
    return _BatchAxisPadder(batch_size, data_collator)
