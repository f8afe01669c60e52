"""Training throughput in the log: samples/s, tokens/s and, on a known GPU, MFU, over each logging window.

At every logging step of training `IPUTrainer.log` adds the rates of the window that ends there (the steps
since the previous log line) to the line, so they also land in `trainer_state.json`'s `log_history`:

- `samples_per_second`: samples trained in the window by all processes together, per second (with
  `--packing`, sequences rather than packed rows).
- `tokens_per_second`: the tokens of those samples that are not padding (the ones of the attention mask, or
  of a sequence in packed rows; every token of a batch without either), per second.
- `mfu` (only on a CUDA GPU listed in `ipu_trainer.training.mfu`): model FLOPs per second over the datasheet peak of
  all the processes' GPUs for the run's compute dtype. With `--device_model` the same ratio against the modelled
  GPU's peak is `modelled_mfu` (the CPU's speed: it says nothing about the GPU's). A batch of B rows padded to length S counts
  B x `transformer_training_flops_per_sequence(S)`, with the vocabulary projection at the masked positions
  only for the masked-position heads (their `max_num_masked_tokens`).

Warm-up: the first window of each `train()` call is not reported. It carries the start-up costs (torch.compile
and kernel autotuning, the memory allocator's growth, data loader workers starting, a resume's fast-forward
through the data), which would mix into the rate; the first log line of a run has no throughput keys and
every later one has them.

Time: the wall-clock time between two log lines, less evaluations and checkpoint saves in between (each timed
from the end of the step before it). The loop reads the loss from the device just before it logs, so the
window ends with the device's work done.

Host syncs: counting a batch reads its shape and adds its attention mask's sum to a counter that stays on the
device; the counters are read once per log line, right after the loop's own read of the loss.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..models.masked_positions import MaskedPositionsHeadMixin
from ..run.device_model import DeviceModel
from ..run.resolved_run import num_hidden_layers_of
from .mfu import datasheet_peak_flops, transformer_training_flops_per_sequence

logger = logging.getLogger(__name__)

# Logging windows at the start of each train() call whose rates are not reported (see the module docstring).
WARMUP_WINDOWS = 1


@dataclass(frozen=True)
class Window:
    """What one logging window counted, summed over the processes."""

    samples: float
    tokens: float
    flops: float
    seconds: float


def device_peak_flops(device: torch.device, dtype: torch.dtype,
                      device_model: Optional[DeviceModel] = None) -> Optional[tuple[float, str]]:
    """The datasheet dense peak (FLOP/s, description) of the CUDA GPU `device` (or of `device_model`, the GPU a CPU
    run models) for matmuls in `dtype`; None on any other device and for a GPU that `ipu_trainer.training.mfu` does
    not list."""
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    if device_model is not None:
        return datasheet_peak_flops(device_model.device_name, dtype, tf32=tf32)
    if device.type != "cuda":
        return None
    return datasheet_peak_flops(torch.cuda.get_device_name(device), dtype, tf32=tf32)


def training_flops_function(model: Any) -> Optional[Callable[[int], float]]:
    """`seq_len -> training FLOPs of one sequence` for a transformer model, or None when its config does not say
    its sizes. Heads other than the vocabulary projection are left out (well under 1% of BERT-base)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = getattr(config, "hidden_size", None)
    layers = num_hidden_layers_of(config)
    vocab = getattr(config, "vocab_size", None)
    # BERT-style configs name the feed-forward width intermediate_size, GPT-2's n_inner (None: 4 x hidden).
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    if intermediate is None and isinstance(hidden, int):
        intermediate = 4 * hidden
    if not all(isinstance(value, int) for value in (hidden, layers, vocab, intermediate)):
        logger.info("No MFU in the training log: the model config does not give its transformer sizes.")
        return None
    masked_positions = getattr(config, "max_num_masked_tokens", None)
    if not isinstance(model, MaskedPositionsHeadMixin) or not isinstance(masked_positions, int):
        masked_positions = None

    @functools.lru_cache(maxsize=64)
    def per_sequence(seq_len: int) -> float:
        positions = None if masked_positions is None else min(masked_positions, seq_len)
        return transformer_training_flops_per_sequence(
            hidden_size=hidden, num_layers=layers, intermediate_size=intermediate, seq_len=seq_len,
            vocab_size=vocab, logit_positions=positions,
        )

    return per_sequence


class ThroughputMeter(TrainerCallback):
    """Counts the batches of each logging window and gives its rates at the log line (module docstring).

    `count_batch` is called once per training batch and `window_metrics` once per training log line, on every
    process (the counts are summed over the processes there). `clock` is the time source, in seconds.
    """

    def __init__(
        self,
        device: torch.device,
        flops_per_sequence: Optional[Callable[[int], float]] = None,
        peak_flops: Optional[float] = None,
        clock: Callable[[], float] = time.perf_counter,
        modelled: bool = False,
    ) -> None:
        self.device = device
        # Against a modelled GPU's peak (--device_model) the ratio is the CPU's speed over that GPU's, logged under
        # its own key so that it is never read as a GPU's utilisation.
        self.mfu_key = "modelled_mfu" if modelled else "mfu"
        self.flops_per_sequence = flops_per_sequence
        self.peak_flops = peak_flops
        self.clock = clock
        self.windows = 0
        self.last_window: Optional[Window] = None
        self._start_window(self.clock())

    @classmethod
    def for_model(cls, model: Any, device: torch.device, compute_dtype: torch.dtype,
                  device_model: Optional[DeviceModel] = None) -> ThroughputMeter:
        """A meter for `model` training on `device` (deciding as `device_model`, if given) with matmuls in
        `compute_dtype`, with MFU where the GPU is known."""
        peak = device_peak_flops(device, compute_dtype, device_model)
        flops = training_flops_function(model) if peak is not None else None
        dtype = str(compute_dtype).replace("torch.", "")
        if peak is not None and flops is not None and device_model is not None:
            logger.info("modelled_mfu in the training log is this CPU's model FLOP/s over the modelled %s: not a GPU "
                        "measurement.", peak[1])
        elif peak is not None and flops is not None:
            logger.info("MFU in the training log is measured against the %s.", peak[1])
        elif device.type == "cuda" or device_model is not None:
            name = device_model.device_name if device_model is not None else torch.cuda.get_device_name(device)
            logger.info("No MFU in the training log: no %s peak for %r in ipu_trainer/mfu.py.", dtype, name)
        return cls(device, flops, peak[0] if peak is not None and flops is not None else None,
                   modelled=device_model is not None)

    # ---- counting -------------------------------------------------------------------------------------

    def _start_window(self, now: float) -> None:
        self._window_start = self._last_event = now
        self._paused = 0.0
        self._samples = 0
        self._flops = 0.0
        self._host_tokens = 0
        self._device_tokens: Optional[torch.Tensor] = None
        self._device_packed: Optional[torch.Tensor] = None  # (sequences, tokens) of packed rows

    def count_batch(self, inputs: Mapping[str, Any]) -> None:
        """Count one training batch: its rows and padded length from its shape, its tokens on its own device."""
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
            return
        rows, length = ids.shape[0], ids.shape[-1]
        sequence_ids = inputs.get("sequence_ids")
        if isinstance(sequence_ids, torch.Tensor):
            # Packed rows (ipu_trainer.data.packing): a sample is a sequence (ids 1..n in each row), a token one that
            # belongs to a sequence (id > 0); counted on the device like the attention mask's tokens.
            counts = torch.stack([sequence_ids.amax(dim=1).sum(), (sequence_ids > 0).sum()])
            self._device_packed = counts if self._device_packed is None else self._device_packed + counts
            if self.flops_per_sequence is not None:
                self._flops += rows * self.flops_per_sequence(length)
            return
        self._samples += rows
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            tokens = mask.sum()  # queued on the mask's device; nothing waits for it
            self._device_tokens = tokens if self._device_tokens is None else self._device_tokens + tokens
        else:
            self._host_tokens += ids.numel()
        if self.flops_per_sequence is not None:
            self._flops += rows * self.flops_per_sequence(length)

    def window_metrics(self) -> dict[str, float]:
        """The rates of the window that ends now (none for a warm-up window), and a new window started."""
        now = self.clock()
        counts = torch.tensor([self._samples, self._host_tokens, self._flops], dtype=torch.float64, device=self.device)
        if self._device_tokens is not None:
            counts[1] += self._device_tokens.to(self.device)
        if self._device_packed is not None:
            counts[:2] += self._device_packed.to(self.device)
        processes = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)  # every process logs at the same steps
            processes = dist.get_world_size()
        samples, tokens, flops = counts.tolist()
        seconds = now - self._window_start - self._paused
        self.last_window = Window(samples=samples, tokens=tokens, flops=flops, seconds=seconds)
        self.windows += 1
        self._start_window(now)
        if self.windows <= WARMUP_WINDOWS or seconds <= 0 or samples == 0:
            return {}
        metrics = {"samples_per_second": samples / seconds, "tokens_per_second": tokens / seconds}
        if self.peak_flops is not None:
            metrics[self.mfu_key] = flops / seconds / (self.peak_flops * processes)
        return metrics

    # ---- timing (TrainerCallback events) --------------------------------------------------------------

    def _pause(self) -> None:
        now = self.clock()
        self._paused += now - self._last_event
        self._last_event = now

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.windows = 0
        self._start_window(self.clock())

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._last_event = self.clock()

    def on_evaluate(self, args, state, control, **kwargs) -> None:
        self._pause()

    def on_save(self, args, state, control, **kwargs) -> None:
        self._pause()
