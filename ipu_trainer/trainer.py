"""`IPUTrainer`: `transformers.Trainer` that keeps the batch math of an IPU config on CPUs and GPUs.

One trainer step takes one dataloader batch of `micro x replicas x accumulation x device_iterations`
samples (per process: the replicas it hosts) and performs `device_iterations` weight updates, each
averaging the gradients of `replicas x accumulation` micro-batches. The upstream loop is left as it is:
it sees one batch per step and no accumulation of its own, performs the last update of each step, and
advances the learning-rate schedule once per step. The updates before the last one happen inside
`training_step`, through the same clip-and-step the loop uses.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import time
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from .data_collators import pad_on_batch_axis
from .ipu_config import IPUConfig
from .models.layers import set_recomputation
from .optimization import Lamb
from .placement import HostOffloadedOptimizer, Placement, ShardedOptimizer, prepare_optimizer_for_checkpoint
from .precision import Precision
from .training_args import IPUTrainingArguments

logger = logging.getLogger(__name__)

LOSS_SCALER_NAME = "loss_scaler.pt"
ASYNC_DATALOADER_WORKERS = 4

SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


def num_hidden_layers_of(config: Any) -> Optional[int]:
    """The number of transformer layers of a model config, whatever the architecture calls it."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def ipu_config_for_run(ipu_config: IPUConfig, args: IPUTrainingArguments) -> IPUConfig:
    """A copy of `ipu_config` with the command line applied: the override string (forwarded flags and
    --ipu_config_overrides) once, then --n_ipu, then validated as a whole."""
    given = ipu_config.to_dict()
    ipu_config = copy.deepcopy(ipu_config)
    overrides = args.ipu_config_overrides_for_run()
    if overrides:
        ipu_config.update_from_string(overrides)
    if args.n_ipu is not None:
        ipu_config.apply_n_ipu(args.n_ipu)
    ipu_config.validate()
    if ipu_config.to_dict() != given:  # applying the same command line twice changes nothing and says nothing
        logger.info("IPU config overridden from the command line: %s%s", overrides,
                    f" and --n_ipu {args.n_ipu}" if args.n_ipu is not None else "")
    return ipu_config


def check_model_fits(ipu_config: IPUConfig, model: nn.Module) -> None:
    """Apply the original's check that layers_per_ipu places exactly the model's layers."""
    num_layers = num_hidden_layers_of(getattr(model, "config", None))
    if num_layers is None:
        logger.warning("Could not find the model's layer count; layers_per_ipu is not checked against it.")
        return
    ipu_config.resolved_layers_per_ipu(num_layers, for_inference=False)
    ipu_config.resolved_layers_per_ipu(num_layers, for_inference=True)


def split_batch(batch: dict[str, Any], micro_batch_size: int) -> list[dict[str, Any]]:
    """Cut a batch of tensors into consecutive micro-batches along the first axis."""
    sizes = {len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    total = sizes.pop()
    return [
        {k: (v[start : start + micro_batch_size] if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
         for k, v in batch.items()}
        for start in range(0, total, micro_batch_size)
    ]


class _StepBatchLogFilter(logging.Filter):
    """Upstream explains a step batch larger than the micro batch as DataParallel; here it is the IPU
    config's batch per step, so the line says that instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "Training with DataParallel so batch size has been adjusted to" in message:
            record.msg = message.replace(
                "Training with DataParallel so batch size has been adjusted to",
                "Samples per step and process (micro batch x replicas x accumulation x device iterations)",
            )
        return True


_STEP_BATCH_LOG_FILTER = _StepBatchLogFilter()


class IPUTrainer(Trainer):
    """Trainer for IPU-config driven runs. Takes the same arguments as `transformers.Trainer` plus:

    Args:
        ipu_config: the run's IPU config as loaded; the trainer applies the command line to a copy of it.
        scheduler_factory: optional `(optimizer, num_training_steps) -> scheduler`, used instead of
            `--lr_scheduler_type` (e.g. the GroupBERT schedule).
    """

    def __init__(
        self,
        model: nn.Module,
        ipu_config: IPUConfig,
        args: IPUTrainingArguments,
        data_collator: Optional[Callable] = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics: Optional[Callable] = None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics: Optional[Callable] = None,
        scheduler_factory: Optional[SchedulerFactory] = None,
        **kwargs,
    ):
        if not isinstance(args, IPUTrainingArguments):
            raise TypeError("IPUTrainer needs IPUTrainingArguments (it owns accumulation and precision)")
        self.ipu_config = ipu_config_for_run(ipu_config, args)
        check_model_fits(self.ipu_config, model)
        self.scheduler_factory = scheduler_factory
        if hasattr(model, "parallelize"):
            model.parallelize(self.ipu_config)
        elif self.ipu_config.recompute_checkpoint_every_layer:
            set_recomputation(model, True)

        if kwargs.get("optimizer_cls_and_kwargs") is None and optimizers[0] is None:
            kwargs["optimizer_cls_and_kwargs"] = self._optimizer_cls_and_kwargs(args, model)
        if args.dataloader_mode != "sync" and args.dataloader_num_workers == 0:
            workers = max(1, min(ASYNC_DATALOADER_WORKERS, (os.cpu_count() or 2) - 1))
            args.dataloader_num_workers = workers
        if args.device.type == "cpu":
            args.dataloader_pin_memory = False  # pinning needs an accelerator; spare the warning
        elif args.dataloader_pin_memory and hasattr(args.accelerator_config, "non_blocking"):
            args.accelerator_config.non_blocking = True  # copies from pinned batches overlap the step before
        if self.ipu_config.executable_cache_dir and (args.torch_compile or args.compile_only):
            # Inductor reads its cache location from the environment each time it compiles (and fills in its
            # default there once asked), so the IPU config's executable_cache_dir is put there explicitly.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(self.ipu_config.executable_cache_dir)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            **kwargs,
        )
        # Each micro-batch loss is a mean over its own tokens and the update averages micro-batches, as on
        # the IPU; the upstream token-count normalisation across accumulation would change that.
        self.model_accepts_loss_kwargs = False
        self.train_placement = Placement.for_training(self.ipu_config, args.per_device_train_batch_size, args.world_size)
        self.eval_placement = Placement.for_inference(self.ipu_config, args.per_device_eval_batch_size, args.world_size)
        self._train_batch_size = self.train_placement.process_batch_size
        logging.getLogger("transformers.trainer").addFilter(_STEP_BATCH_LOG_FILTER)  # adding it twice is a no-op
        self.precision = Precision.for_run(
            args.device, args.fp32, args.half_precision_request, args.loss_scaling, self.ipu_config.auto_loss_scaling
        )
        self._log_run_layout()

    def _optimizer_cls_and_kwargs(self, args: IPUTrainingArguments, model: nn.Module) -> tuple[type, dict[str, Any]]:
        """LAMB or the upstream choice (AdamW by default); its state in host memory for
        optimizer_state_offchip on a GPU, and sharded over the processes (ZeRO stage 1) for
        replicated_tensor_sharding."""
        if args.lamb:
            optimizer_cls, optimizer_kwargs = Lamb, {
                "lr": args.learning_rate,
                "betas": (args.adam_beta1, args.adam_beta2),
                "eps": args.adam_epsilon,
                "bias_correction": not args.lamb_no_bias_correction,
            }
        else:
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if self._offloads_optimizer_state(args):
            optimizer_cls = functools.partial(HostOffloadedOptimizer, optimizer_class=optimizer_cls)
        if self._shards_optimizer_state(args):
            # Each process keeps the optimizer state of 1/W of the parameters and broadcasts its updated
            # shard: the same update, 1/W of the state memory.
            return ShardedOptimizer, {"optimizer_class": optimizer_cls, **optimizer_kwargs}
        if isinstance(optimizer_cls, functools.partial):
            return optimizer_cls.func, {**optimizer_cls.keywords, **optimizer_kwargs}
        return optimizer_cls, optimizer_kwargs

    def _shards_optimizer_state(self, args: IPUTrainingArguments) -> bool:
        return bool(self.ipu_config.replicated_tensor_sharding) and args.world_size > 1

    def _offloads_optimizer_state(self, args: IPUTrainingArguments) -> bool:
        return bool(self.ipu_config.optimizer_state_offchip) and args.device.type == "cuda"

    # ---- start-up log -------------------------------------------------------------------------------

    def _log_run_layout(self) -> None:
        device = self.args.device
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
        lines = [f"device: {device} ({device_name})"]
        lines += self.train_placement.describe()
        lines.append(
            f"evaluation batch: {self.eval_placement.samples_per_step} samples "
            f"(micro {self.eval_placement.micro_batch_size} x inference replicas "
            f"{self.ipu_config.inference_replication_factor} x inference device iterations "
            f"{self.eval_placement.device_iterations})"
        )
        lines.append(f"precision: {self.precision.describe()}")
        optimizer = "LAMB" + (" without bias correction" if self.args.lamb_no_bias_correction else "") if self.args.lamb else str(getattr(self.args.optim, "value", self.args.optim))
        lines.append(f"optimizer: {optimizer}")
        lines.append(
            "recomputation: " + ("every layer (activation checkpointing)" if self.ipu_config.recompute_checkpoint_every_layer else "off")
        )
        chunks = max(self.ipu_config.embedding_serialization_factor or 1, self.ipu_config.projection_serialization_factor or 1)
        if chunks > 1 and not hasattr(self.model, "parallelize"):
            lines.append(f"vocabulary projection: in one piece ({type(self.model).__name__} has no chunked head)")
        elif chunks > 1:
            lines.append(f"vocabulary projection: computed in {chunks} chunks")
        sharded, offloaded = self._shards_optimizer_state(self.args), self._offloads_optimizer_state(self.args)
        state = f"sharded over {self.args.world_size} processes (ZeRO stage 1)" if sharded else "one full copy per process"
        lines.append(f"optimizer state: {state}, in {'host' if offloaded else self.args.device.type.upper()} memory")
        if self.args.dataloader_mode != "sync":
            lines.append(f"dataloader: {self.args.dataloader_mode}, {self.args.dataloader_num_workers} worker process(es)")
        if self.args.pad_on_batch_axis:
            lines.append("batches padded on the batch axis to the full step size")
        logger.info("***** IPU config on this machine *****\n  " + "\n  ".join(lines))
        ipu_only = self.ipu_config.ipu_only_settings()
        if sharded:
            ipu_only.pop("replicated_tensor_sharding", None)
        if offloaded:
            ipu_only.pop("optimizer_state_offchip", None)
        if ipu_only:
            settings = ", ".join(f"{name}={value!r}" for name, value in ipu_only.items())
            logger.info("IPU-only settings with no effect on %s: %s", device.type.upper(), settings)

    # ---- data ---------------------------------------------------------------------------------------

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, dataloader_key=None):
        placement = self.train_placement if is_training else self.eval_placement
        batch_size = placement.process_batch_size
        if not self.args.pad_on_batch_axis:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        collator = self.data_collator
        self.data_collator = pad_on_batch_axis(batch_size, collator)
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        finally:
            self.data_collator = collator

    # ---- optimisation -------------------------------------------------------------------------------

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        if self.lr_scheduler is None and self.scheduler_factory is not None:
            self.lr_scheduler = self.scheduler_factory(optimizer or self.optimizer, num_training_steps)
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)

    def autocast_smart_context_manager(self, cache_enabled: Optional[bool] = True):
        return self.precision.autocast()

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Run one step: `device_iterations` weight updates over the micro-batches of this batch.

        Each update accumulates the gradients of up to `micro_batches_per_update` micro-batches, each loss
        divided by the number of micro-batches in that update (their mean). All updates but the last are
        applied here; the upstream loop applies the last one, then advances the schedule once.
        """
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        micro_batches = split_batch(inputs, self.train_placement.micro_batch_size)
        per_update = self.train_placement.micro_batches_per_update
        updates = [micro_batches[i : i + per_update] for i in range(0, len(micro_batches), per_update)]

        total_loss = torch.zeros((), device=self.args.device)
        for update_index, update in enumerate(updates):
            for index, micro_batch in enumerate(update):
                # Processes all-reduce gradients once per update, on its last micro-batch.
                last = index == len(update) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    with self.compute_loss_context_manager():
                        loss = self.compute_loss(model, micro_batch)
                    total_loss += loss.detach().float()
                    loss = loss / len(update)
                    if self.precision.loss_scaler is not None:
                        loss = self.precision.loss_scaler.scale_loss(loss)
                    self.accelerator.backward(loss)
            if self.precision.loss_scaler is not None:
                self.precision.loss_scaler.unscale_or_skip(model.parameters())
            if update_index < len(updates) - 1:
                self._apply_update(model)
        return total_loss / len(micro_batches)

    def _apply_update(self, model: nn.Module) -> None:
        """One of the device iterations inside a step, clipped and applied like the loop's own update."""
        if self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        model.zero_grad()

    # ---- checkpoints --------------------------------------------------------------------------------

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            self.ipu_config.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        prepare_optimizer_for_checkpoint(self.optimizer, self.args.device)  # a sharded state is gathered on process 0
        super()._save_optimizer_and_scheduler(output_dir)
        if self.precision.loss_scaler is not None and self.args.should_save:
            torch.save(self.precision.loss_scaler.state_dict(), os.path.join(output_dir, LOSS_SCALER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.precision.loss_scaler is None:
            return
        path = os.path.join(checkpoint, LOSS_SCALER_NAME)
        if os.path.isfile(path):
            self.precision.loss_scaler.load_state_dict(torch.load(path, weights_only=True))

    # ---- compile only -------------------------------------------------------------------------------

    def compile_only(self) -> TrainOutput:
        """Compile the model on one micro-batch (forward and backward) and stop, as `--compile_only` asks."""
        dataset = self.train_dataset if self.train_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("--compile_only needs a dataset to take one batch from (--do_train or --do_eval data)")
        loader = self.get_train_dataloader() if self.train_dataset is not None else self.get_eval_dataloader()
        micro_batch = split_batch(self._prepare_inputs(next(iter(loader))), self.train_placement.micro_batch_size)[0]
        self.model.to(self.args.device)
        compiled = torch.compile(self.model)
        start = time.perf_counter()
        compiled.train()
        with self.compute_loss_context_manager():
            loss = self.compute_loss(compiled, micro_batch)
        loss.backward()
        self.model.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default inductor cache")
        logger.info(
            "--compile_only: model compiled in %.1f s (loss %.4f on one micro-batch); kernels cached in %s. "
            "Stopping without training.", seconds, loss.item(), cache,
        )
        return TrainOutput(global_step=0, training_loss=float(loss.item()), metrics={"compile_seconds": seconds})
