"""Data collators for BERT-style pretraining."""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase, default_data_collator

from ..models.layers import IGNORE_INDEX

if TYPE_CHECKING:
    from ..run.resolved_run import ResolvedRun

logger = logging.getLogger(__name__)

# Half-precision matmuls run on tensor cores when their dimensions are multiples of 8.
HALF_PRECISION_PADDING_MULTIPLE = 8


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

    `whole_word_mask` (upstream's field, off by default) masks whole words instead of single tokens, still at
    most `max_num_masked_tokens` tokens per sequence and with the 80/10/10 rule per word; see
    `torch_mask_tokens`. Word boundaries come from the tokenizer's vocabulary (`WordBoundaries`), looked up
    once here.
    """

    max_seq_length: int | None = None
    max_num_masked_tokens: int | None = None
    # Declared by upstream too (then it keeps upstream's place in the constructor); stated here because this
    # class gives it its own meaning.
    whole_word_mask: bool = False

    def __post_init__(self) -> None:
        # Upstream's whole-word masking reads offset mappings from the data and forces every chosen token to
        # [MASK]; this class masks whole words its own way (from the vocabulary, 80/10/10 per word), so the
        # upstream set-up runs as it does for token masking and the flag is put back afterwards.
        whole_word_mask = self.whole_word_mask
        self.whole_word_mask = False
        super().__post_init__()
        self.whole_word_mask = whole_word_mask
        if whole_word_mask and not self.mlm:
            raise ValueError("whole_word_mask=True needs mlm=True: whole-word masking is a masked-LM setting")
        self.word_boundaries = WordBoundaries.of(self.tokenizer) if whole_word_mask else None
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

        With `whole_word_mask` the unit of steps 1-3 is a word (`_choose_whole_words`): each word is chosen
        with probability p (so p of the tokens, in expectation), the cap keeps whole words in a random order
        while their tokens fit in C, and one draw u per word gives all of its tokens the same treatment
        (each replaced token gets its own random id).
        """
        generator = content_seeded_generator(self.seed, inputs) if self.seed is not None else self.generator
        labels = inputs.clone()
        if special_tokens_mask is None:
            not_maskable = torch.isin(inputs, torch.tensor(self.tokenizer.all_special_ids, device=inputs.device))
        else:
            not_maskable = torch.as_tensor(special_tokens_mask, dtype=torch.bool, device=inputs.device)
        if self.tokenizer.pad_token_id is not None:
            not_maskable = not_maskable | (inputs == self.tokenizer.pad_token_id)

        cap = self.max_num_masked_tokens
        if cap is None:
            cap = max_num_masked_tokens(inputs.shape[1], self.mlm_probability)
        if self.whole_word_mask:
            chosen, draw = self._choose_whole_words(inputs, ~not_maskable, cap, generator)
        else:
            probability = torch.full(inputs.shape, self.mlm_probability).masked_fill_(not_maskable, 0.0)
            chosen = torch.bernoulli(probability, generator=generator).bool()
            if cap < inputs.shape[1]:
                chosen = keep_at_most(chosen, cap, generator)
            draw = torch.rand(inputs.shape, generator=generator)

        labels[~chosen] = IGNORE_INDEX
        to_mask = chosen & (draw < self.mask_replace_prob)
        to_random = chosen & ~to_mask & (draw < self.mask_replace_prob + self.random_replace_prob)
        inputs[to_mask] = self.tokenizer.mask_token_id
        random_ids = torch.randint(len(self.tokenizer), inputs.shape, dtype=inputs.dtype, generator=generator)
        inputs[to_random] = random_ids[to_random]
        return inputs, labels

    def _choose_whole_words(
        self, inputs: torch.Tensor, maskable: torch.Tensor, cap: int, generator: Optional[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole words chosen for masking, as a token mask [B, S], and each token's word's U(0, 1) draw [B, S].

        Each token's word index w < S comes from `WordBoundaries.word_index`; per-word values live in [B, S]
        tensors indexed by w (slots past a row's last word have no tokens and are never read back). Each word
        is chosen with probability p. Cap: the chosen words of a row get U(0, 1) scores, are sorted by score,
        and are kept while the running total of their lengths is at most C; the first word that does not fit
        ends the row's selection, so no word is cut and no row exceeds C tokens.
        """
        rows, length = inputs.shape
        # Tokens in no word (-1) point at slot 0 and add nothing to its length; the final `& maskable` drops them.
        word = self.word_boundaries.word_index(inputs, maskable).clamp_(min=0)
        word_length = torch.zeros(rows, length, dtype=torch.long).scatter_add_(1, word, maskable.long())

        chosen_words = torch.bernoulli(torch.full((rows, length), self.mlm_probability), generator=generator).bool()
        if cap < length:
            scores = torch.rand(rows, length, generator=generator).masked_fill_(~chosen_words, 2.0)
            order = scores.argsort(dim=1)
            tokens_so_far = (word_length * chosen_words).gather(1, order).cumsum(dim=1)
            chosen_words &= torch.zeros_like(chosen_words).scatter_(1, order, tokens_so_far <= cap)
        draw = torch.rand(rows, length, generator=generator)
        return chosen_words.gather(1, word) & maskable, draw.gather(1, word)


@dataclass(frozen=True)
class WordBoundaries:
    """Where words begin and end, per vocabulary id: the lookup tables of whole-word masking.

    `continues[i]`: token i continues the word of the token before it. `ends[i]`: the word ends with token i
    whatever follows (a token ending in a line break). The marking convention is read from the vocabulary:

    - WordPiece marks a word's later pieces: "##ing" continues, every other token starts a word.
    - Byte-level BPE (GPT-2, RoBERTa) and SentencePiece mark a word's first piece with the space it followed,
      "Ġ" or "▁": a token without the marker continues the word before it, so punctuation sticks to the word
      it follows ("end." is one word). Line breaks and tabs ("Ċ", "ĉ", "č" in byte-level BPE's alphabet)
      count as a word start at the start of a token and as a word end at its end.

    The convention with the most marked tokens in the vocabulary wins; a vocabulary with none of the markers
    is refused. Special tokens are left out here: the masking never puts them in a word.
    """

    continues: torch.Tensor
    ends: torch.Tensor

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> WordBoundaries:
        vocab = tokenizer.get_vocab()
        size = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
        special = set(tokenizer.all_special_tokens)
        tokens = {token: index for token, index in vocab.items() if token not in special}
        counts = {marker: sum(token.startswith(marker) for token in tokens) for marker in _WORD_MARKERS}
        marker = max(counts, key=counts.__getitem__)
        if counts[marker] == 0:
            raise ValueError(
                f"--whole_word_mask: the vocabulary of {type(tokenizer).__name__} has no word markers (no '##' "
                "continuation pieces, no 'Ġ' or '▁' word starts), so words cannot be told apart; use a WordPiece, "
                "byte-level BPE or SentencePiece tokenizer, or leave out --whole_word_mask"
            )
        ends: list[int] = []
        if marker == _CONTINUATION_PREFIX:
            continues = [index for token, index in tokens.items() if token.startswith(marker) and token != marker]
        else:
            breaks = _LINE_BREAKS[marker]
            continues = [index for token, index in tokens.items() if not token.startswith((marker, *breaks))]
            ends = [index for token, index in tokens.items() if token.endswith(breaks)]
        return cls(continues=_index_mask(size, continues), ends=_index_mask(size, ends))

    def word_index(self, inputs: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
        """Each token's word, numbered 0, 1, ... along its row of `inputs` [B, S]; -1 for tokens in no word.

        A maskable token starts a word unless it continues the token before it (`continues`, and that token
        is maskable and does not end its word); tokens that are not maskable (special tokens, padding) are in
        no word and end the one before them. Numbering the word starts along the row (a cumulative sum) gives
        every token of a word the same index.
        """
        previous_maskable = F.pad(maskable[:, :-1], (1, 0), value=False)
        previous_ids = F.pad(inputs[:, :-1], (1, 0), value=0)  # only read where the previous token is maskable
        continues = self.continues[inputs] & ~self.ends[previous_ids] & previous_maskable
        starts = maskable & ~continues
        return (starts.cumsum(dim=1) - 1).masked_fill_(~maskable, -1)


_CONTINUATION_PREFIX = "##"
_WORD_MARKERS = (_CONTINUATION_PREFIX, "Ġ", "▁")
# Line break, tab and carriage return as each word-start convention writes them.
_LINE_BREAKS = {"Ġ": ("Ċ", "ĉ", "č"), "▁": ("\n", "\t", "\r")}


def _index_mask(size: int, indices: list[int]) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[torch.tensor(indices, dtype=torch.long)] = True
    return mask


def pad_to_multiple_of_for(run: ResolvedRun, max_length: Optional[int] = None) -> Optional[int]:
    """The `pad_to_multiple_of` for a run's padding collators: 8 in half precision on a GPU (or a device model of
    one), else None.

    Dynamically padded batches (run_mlm.py --line_by_line without --pad_to_max_length) are rounded up to a
    multiple of 8 tokens so their matmuls run on tensor cores; batches whose rows all have one fixed length
    (blocks, sentence pairs, --pad_to_max_length) are left as they are. With `max_length` given and not a
    multiple of 8 the answer is None, since rounding up could make a batch longer than `max_length` (and the
    model's positions).
    """
    if run.precision.mixed_precision == "no" or not run.decides_as_gpu:
        return None
    multiple = HALF_PRECISION_PADDING_MULTIPLE
    if max_length is not None and max_length % multiple:
        logger.info(
            "Batches are not padded to a multiple of %d: --max_seq_length %d is not one, and rounding up could pass it.",
            multiple, max_length,
        )
        return None
    return multiple


def content_seeded_generator(seed: int, inputs: torch.Tensor, purpose: str = "") -> torch.Generator:
    """A generator seeded from `seed`, `purpose` and the bytes of `inputs`: a batch draws the same numbers whenever
    and wherever it is drawn (one batch ahead of the step, after a resume, in any dataloader worker)."""
    key = f"{purpose}:{seed}" if purpose else str(seed)
    digest = hashlib.blake2b(inputs.cpu().numpy().tobytes(), digest_size=8, key=key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def keep_at_most(selected: torch.Tensor, cap: int, generator: torch.Generator | None) -> torch.Tensor:
    """`selected` ([rows, positions], bool) with at most `cap` True per row: of a row with more, a uniformly random
    `cap` of them (each selected position draws a U(0, 1) score, the others score -1, the top `cap` survive)."""
    scores = torch.rand(selected.shape, generator=generator).masked_fill_(~selected, -1.0)
    kept = torch.zeros_like(selected).scatter_(1, scores.topk(cap, dim=1).indices, True)
    return selected & kept


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
