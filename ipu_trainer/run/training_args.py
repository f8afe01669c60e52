"""`IPUTrainingArguments`: `transformers.TrainingArguments` plus the flags of the IPU examples.

The arguments keep what the user gave. The IPU config owns the batch arithmetic (accumulation, replicas,
device iterations), recomputation and loss scaling; the flags that touch those settings
(`--gradient_accumulation_steps`, `--gradient_checkpointing`, `--auto_loss_scaling`) are forwarded into
it, and what the upstream training loop sees is derived from both, once, by `resolved_run.resolve_run`.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import TrainingArguments
from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

from ..config.ipu_config import ALLOWED_POD_TYPES, VALID_N_IPU
from .device_model import device_model_named
from .fsdp import check_fsdp_options

logger = logging.getLogger(__name__)

ALLOWED_N_IPU = list(VALID_N_IPU)  # the name optimum-graphcore code imports
# --optim's default: the optimizer the original trainer always built (poptorch's AdamW, or LAMB with --lamb).
ORIGINAL_OPTIMIZER = "poptorch"
# The original gave LAMB no betas, so poptorch's defaults applied whatever --adam_beta1/2 said.
ORIGINAL_LAMB_BETAS = (0.9, 0.999)
# The optimizer name upstream's argument checks see in its place (the class is chosen by IPUTrainer).
_UPSTREAM_STAND_IN_OPTIMIZER = "adamw_torch"
DATALOADER_MODES = ("sync", "async", "async_rebatched")
# --report_to names whose pip package has another name.
_REPORT_TO_PACKAGES = {"flyte": "flytekit"}
# Integrations whose availability is not "the package is installed": azure_ml is listed as available only without
# mlflow (though it works with it), kubeflow only inside a Kubeflow job. Not refused here.
_REPORT_TO_NOT_CHECKED = ("azure_ml", "kubeflow")


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _environment_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


@dataclass
class IPUTrainingArguments(TrainingArguments):
    ipu_config_name: Optional[str] = field(
        default=None,
        metadata={
            "help": "The IPU config: a folder holding ipu_config.json, a path to a .json file, or a hub id such as "
            "Graphcore/bert-base-ipu. Defaults to --model_name_or_path when that holds one."
        },
    )
    ipu_config_overrides: Optional[str] = field(
        default=None,
        metadata={
            "help": 'Override IPU config values, e.g. "device_iterations=1,matmul_proportion=[0.14 0.19 0.19 0.19]". '
            "Lists in square brackets, space separated; booleans true/false. Unknown keys are an error."
        },
    )
    n_ipu: Optional[int] = field(
        default=None,
        metadata={
            "help": "Total IPUs of the original run (1, 2, 4, 8, 16, 32 or 64). Sets replication_factor = "
            "n_ipu // ipus_per_replica (and the inference twin), which fixes the global batch of the recipe."
        },
    )
    fp32: bool = field(
        default=False,
        metadata={"help": "Train in float32. Otherwise mixed precision: bfloat16 where the device runs it fast, "
                  "float16 with loss scaling on GPUs without bfloat16, float32 on CPUs without bfloat16 support."},
    )
    lamb: bool = field(
        default=False,
        metadata={"help": "Use LAMB instead of AdamW, as the original: poptorch's LAMB with weight decay on the "
                  "weights, none on biases and LayerNorm weights, and no trust ratio for biases (a plain Adam step)."},
    )
    lamb_no_bias_correction: bool = field(
        default=False, metadata={"help": "Use LAMB without bias correction of the Adam moments (implies --lamb)."}
    )
    optim: str = field(
        default=ORIGINAL_OPTIMIZER,
        metadata={"help": f"{ORIGINAL_OPTIMIZER} (default): the original's optimizer, poptorch's AdamW without bias "
                  "correction (decoupled weight decay, none on biases and LayerNorm weights), or LAMB with --lamb. "
                  "Any transformers optimizer name (adamw_torch_fused, sgd, ...) departs from the original and is "
                  "logged as such."},
    )
    max_grad_norm: Optional[float] = field(
        default=None,
        metadata={"help": "Clip the gradient norm of each weight update to this value. Off by default: the original "
                  "never clipped (given, it is honoured and logged as a departure from the original)."},
    )
    dataloader_drop_last: Optional[bool] = field(
        default=None,
        metadata={"help": "Drop the last incomplete batch. Not given: dropped in training (as the original's "
                  "dataloader), kept in evaluation. Given: applies to both.",
                  # "--dataloader_drop_last" alone means True, as for upstream's plain bool flag.
                  "nargs": "?", "const": True},
    )
    loss_scaling: Optional[float] = field(
        default=None,
        metadata={"help": "Static loss scale for float16 training. With --auto_loss_scaling it is the starting "
                  "value of a dynamically adjusted scale. Not needed (and ignored) in bfloat16 or float32."},
    )
    auto_loss_scaling: bool = field(
        default=False,
        metadata={"help": "Adjust the float16 loss scale automatically (forwarded to the IPU config)."},
    )
    device_model: Optional[str] = field(
        default=None,
        metadata={"help": "Run on the CPU while taking every decision this NVIDIA GPU would (precision and float16 loss "
                  "scaling, optimizer state offload and sharding, padding, MFU): V100, T4, A10G, L4, A100, H100, H200, "
                  "B200, ... (any case; an unknown name lists them all). For smoke tests of a GPU configuration "
                  "without a GPU: no CUDA kernel runs. Under torchrun every process models the same GPU (gloo)."},
    )
    pipeline: Optional[str] = field(
        default=None,
        metadata={"help": "Under torchrun, run each replica as a pipeline of ipus_per_replica processes, its layers "
                  "placed as layers_per_ipu says (W processes: W / ipus_per_replica data-parallel pipelines); each "
                  "update's micro-batches flow through the stages. --pipeline alone uses the 1F1B schedule; "
                  "--pipeline GPipe the GPipe one.",
                  "nargs": "?", "const": "1F1B", "choices": ["1F1B", "GPipe"]},
    )
    dataloader_mode: str = field(
        default="sync",
        metadata={
            "help": "sync: batches built in the training process (or by --dataloader_num_workers workers). "
            "async / async_rebatched: batches built ahead in worker processes with prefetching.",
            "choices": list(DATALOADER_MODES),
        },
    )
    compile_only: bool = field(
        default=False,
        metadata={"help": "Compile the model with torch.compile (cache in the IPU config's executable_cache_dir), "
                  "run one forward and backward pass to build the kernels, and stop without training."},
    )
    pad_on_batch_axis: bool = field(
        default=False,
        metadata={"help": "Pad every batch up to the full step batch size by repeating samples, so each step sees "
                  "one shape and --dataloader_drop_last is not needed."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into a non-empty --output_dir that holds no checkpoint (otherwise refused), or start "
                  "afresh instead of resuming from the checkpoint found there."},
    )
    warmup_ratio: Optional[float] = field(
        default=None,
        metadata={"help": "Fraction of the training steps used for a linear warmup of the learning rate (0 <= r < 1). "
                  "The IPU recipes' flag; the same as a fractional --warmup_steps."},
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Log a NaN or inf loss as the average of the logging window instead. Off by default, as "
                  "in the original: a diverging run shows in the log."},
    )
    # Redefined with a default of None so that "not given" leaves the IPU config's value alone.
    gradient_accumulation_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Micro-batches accumulated per replica before each weight update. Forwarded to the IPU "
                  "config (gradient_accumulation_steps=N), which owns accumulation; wins over an "
                  "--ipu_config_overrides of the same field."},
    )
    # The original's defaults: one sample per micro-batch unless the recipe says otherwise.
    per_device_train_batch_size: int = field(
        default=1, metadata={"help": "Micro batch size: samples per replica per micro-batch in training."}
    )
    per_device_eval_batch_size: int = field(
        default=1, metadata={"help": "Micro batch size in evaluation: samples per inference replica per device iteration."}
    )

    # Flags of optimum-graphcore's IPUTrainingArguments that transformers 5 renamed or dropped. Each is mapped
    # to its current form in __post_init__ and then cleared, so a copy (dataclasses.replace) that changes the
    # current form is not overruled by the old one; pod_type alone is kept (after setting --n_ipu), because it
    # also picks the per-POD entries of the IPU config.
    pod_type: Optional[str] = field(
        default=None,
        metadata={"help": "The IPU-POD the original run used (optimum-graphcore 0.3-0.6): podN means --n_ipu N, and "
                  "picks the podN entries of an IPU config whose values are given per POD type.",
                  "choices": list(ALLOWED_POD_TYPES)},
    )
    evaluation_strategy: Optional[str] = field(
        default=None, metadata={"help": "The transformers 4 name of --eval_strategy (no, steps, epoch)."}
    )
    logging_dir: Optional[str] = field(
        default=None,
        metadata={"help": "TensorBoard log folder (transformers 4's flag; it sets TENSORBOARD_LOGGING_DIR unless that "
                  "is already set)."},
    )
    past_index: int = field(
        default=-1, metadata={"help": "Accepted for compatibility; only the default -1 (no past states) is supported."}
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "The transformers 4 name of --train_sampling_strategy group_by_length."}
    )
    include_inputs_for_metrics: bool = field(
        default=False, metadata={"help": "The transformers 4 name of --include_for_metrics inputs."}
    )
    push_to_hub_model_id: Optional[str] = field(
        default=None, metadata={"help": "Deprecated: the repository name for --push_to_hub; use --hub_model_id."}
    )
    push_to_hub_organization: Optional[str] = field(
        default=None, metadata={"help": "Deprecated: the organization for --push_to_hub; use --hub_model_id org/name."}
    )
    push_to_hub_token: Optional[str] = field(
        default=None, metadata={"help": "Deprecated: the token for --push_to_hub; use --hub_token."}
    )

    def __post_init__(self):
        # Refused before upstream's set-up, which would otherwise start building the DeepSpeed/FSDP plugins.
        if self.deepspeed or _environment_flag("ACCELERATE_USE_DEEPSPEED"):
            raise ValueError(
                "--deepspeed is not supported: DeepSpeed makes every micro-batch a weight update, while the IPU config "
                "accumulates replicas x accumulation micro-batches per update. Use torchrun with "
                "replicated_tensor_sharding (ZeRO stage 1) and optimizer_state_offchip in the IPU config instead"
            )
        if self.fsdp:
            check_fsdp_options(self.fsdp, self.fsdp_config)  # FSDP2 only (see run/fsdp.py)
        elif _environment_flag("ACCELERATE_USE_FSDP"):
            # accelerate would build its FSDP plugin from the environment, without the run's precision and offload.
            raise ValueError("ACCELERATE_USE_FSDP is not supported: pass --fsdp full_shard (and --fsdp_config) instead")
        if self.auto_find_batch_size:
            raise ValueError(
                "--auto_find_batch_size is not supported: it would shrink the micro batch and with it the samples per "
                "weight update that the IPU config fixes; set --per_device_train_batch_size (and raise "
                "--gradient_accumulation_steps to keep the update size)"
            )
        self._map_original_flags()
        if self.n_ipu is not None and self.n_ipu not in VALID_N_IPU:
            raise ValueError(
                f"--n_ipu={self.n_ipu} is invalid: must be one of {', '.join(map(str, VALID_N_IPU))}"
            )
        if self.dataloader_mode not in DATALOADER_MODES:
            raise ValueError(
                f"--dataloader_mode={self.dataloader_mode!r} is invalid: choose one of {', '.join(DATALOADER_MODES)}"
            )
        if self.loss_scaling is not None and self.loss_scaling <= 0:
            raise ValueError(f"--loss_scaling={self.loss_scaling} is invalid: must be > 0")
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio={self.warmup_ratio} is invalid: must be in [0, 1)")
            if self.warmup_steps:
                raise ValueError("--warmup_ratio and --warmup_steps both set the warmup: give one of them")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"--gradient_accumulation_steps={self.gradient_accumulation_steps} is invalid: must be >= 1"
            )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} is invalid: must be >= 1")
        if self.fp32 and (self.fp16 or self.bf16):
            raise ValueError(f"--fp32 and --{'fp16' if self.fp16 else 'bf16'} contradict each other: pick one")
        self._check_training_length()
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name}={value} is invalid: must be a number >= 0")

        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"--max_grad_norm={self.max_grad_norm} is invalid: must be a number >= 0 (0: no clipping)")
        original_optimizer = str(getattr(self.optim, "value", self.optim)) == ORIGINAL_OPTIMIZER
        if self.uses_lamb and not original_optimizer:
            raise ValueError(
                f"--{'lamb_no_bias_correction' if self.lamb_no_bias_correction else 'lamb'} and --optim {self.optim} "
                "both choose the optimizer: give one of them"
            )

        if self.device_model is not None:
            # An unknown name is refused before anything is set up; a known one is spelled as the table does, so
            # that `v100` and `V100` are the same run to the run record.
            self.device_model = device_model_named(self.device_model).name
            self.use_cpu = True  # the run is on the CPU (gloo under torchrun) whatever the machine has
        if not self.use_cpu and not _has_accelerator():
            # Lets accelerate set up gloo data parallelism when torchrun starts several CPU processes.
            self.use_cpu = True
        if original_optimizer:
            self.optim = _UPSTREAM_STAND_IN_OPTIMIZER
        pin_memory = self.dataloader_pin_memory
        try:
            super().__post_init__()
        finally:
            if original_optimizer:
                self.optim = ORIGINAL_OPTIMIZER
        if self.fsdp:
            check_fsdp_options("", self.fsdp_config)  # now parsed, also when given as a file or a JSON string
        if self.device_model is not None:
            # Upstream turns pinning off for a CPU run; the modelled GPU's decision (non-blocking batch copies) reads
            # the user's value. The loop's copy still does not pin on the CPU (ResolvedRun.loop_arguments).
            self.dataloader_pin_memory = pin_memory
        self._check_report_to()

    def _check_training_length(self) -> None:
        # A NaN epoch count fails deep in the trainer ("cannot convert float NaN to integer"); zero epochs without
        # --max_steps trains nothing and would still write the untrained model over a previous one.
        epochs = self.num_train_epochs
        if not (math.isfinite(epochs) and epochs >= 0):
            raise ValueError(f"--num_train_epochs={epochs} is invalid: must be a number >= 0 (e.g. 3)")
        if self.do_train and self.max_steps <= 0 and epochs == 0:
            raise ValueError(
                f"--num_train_epochs 0 with --max_steps {self.max_steps} trains nothing: give --num_train_epochs > 0 "
                "or --max_steps > 0 (or leave out --do_train to only evaluate)"
            )

    def _check_report_to(self) -> None:
        """Each --report_to integration must be known and installed; upstream finds out only when the trainer is
        built, after the data and the model are loaded."""
        available = set(get_available_reporting_integrations())
        for name in self.report_to or []:
            if name not in INTEGRATION_TO_CALLBACK:
                raise ValueError(
                    f"--report_to {name} is not a known integration: use none or one of {', '.join(INTEGRATION_TO_CALLBACK)}"
                )
            if name not in available and name not in _REPORT_TO_NOT_CHECKED:
                raise ValueError(
                    f"--report_to {name}: the {name} package is not installed. To fix: pip install "
                    f"{_REPORT_TO_PACKAGES.get(name, name)}, or pass --report_to none"
                )

    def _map_original_flags(self) -> None:
        """The flags of optimum-graphcore code in their transformers 5 form (see the field comment)."""
        if self.pod_type is not None:
            if self.pod_type not in ALLOWED_POD_TYPES:
                raise ValueError(
                    f"--pod_type={self.pod_type!r} is invalid: choose one of {', '.join(ALLOWED_POD_TYPES)}"
                )
            pod_ipus = int(self.pod_type[len("pod"):])
            if self.n_ipu is not None and self.n_ipu != pod_ipus:
                raise ValueError(
                    f"--pod_type {self.pod_type} means --n_ipu {pod_ipus}, which contradicts --n_ipu {self.n_ipu}: "
                    "give one of them"
                )
            self.n_ipu = pod_ipus  # what the 0.6.1 release did with --pod_type
        if self.evaluation_strategy is not None:
            legacy = str(getattr(self.evaluation_strategy, "value", self.evaluation_strategy))
            current = str(getattr(self.eval_strategy, "value", self.eval_strategy))
            if current not in ("no", legacy):
                raise ValueError(
                    f"--evaluation_strategy {legacy} and --eval_strategy {current} contradict each other: give "
                    "--eval_strategy only"
                )
            self.eval_strategy, self.evaluation_strategy = legacy, None
        if self.logging_dir is not None:
            # transformers 5's TensorBoard callback reads its folder from the environment only.
            os.environ.setdefault("TENSORBOARD_LOGGING_DIR", os.path.expanduser(self.logging_dir))
        if self.past_index != -1:
            raise ValueError(
                f"--past_index={self.past_index} is not supported: transformers 5 no longer feeds past states "
                "back to the model; leave it at -1"
            )
        if self.group_by_length:
            if self.train_sampling_strategy not in ("random", "group_by_length"):
                raise ValueError(
                    f"--group_by_length and --train_sampling_strategy {self.train_sampling_strategy} contradict each "
                    "other: give --train_sampling_strategy only"
                )
            self.train_sampling_strategy, self.group_by_length = "group_by_length", False
        if self.include_inputs_for_metrics:
            if "inputs" not in self.include_for_metrics:
                self.include_for_metrics = [*self.include_for_metrics, "inputs"]
            self.include_inputs_for_metrics = False
        if self.push_to_hub_model_id is not None and self.hub_model_id is None:
            organization = self.push_to_hub_organization
            self.hub_model_id = f"{organization}/{self.push_to_hub_model_id}" if organization else self.push_to_hub_model_id
        if self.push_to_hub_token is not None and self.hub_token is None:
            self.hub_token = self.push_to_hub_token
        self.push_to_hub_model_id = self.push_to_hub_organization = self.push_to_hub_token = None

    @property
    def uses_lamb(self) -> bool:
        """--lamb or --lamb_no_bias_correction (either flag selects LAMB)."""
        return self.lamb or self.lamb_no_bias_correction

    @property
    def uses_original_optimizer(self) -> bool:
        """The original trainer's optimizer (`--optim poptorch`, the default): its AdamW, or LAMB with --lamb."""
        return str(getattr(self.optim, "value", self.optim)) == ORIGINAL_OPTIMIZER

    def departures_from_original(self) -> list[str]:
        """The settings given that change the original's math, one line each (the start-up log warns of them)."""
        departures = []
        if not self.uses_original_optimizer:
            departures.append(f"--optim {getattr(self.optim, 'value', self.optim)} (the original always used poptorch's "
                              "AdamW without bias correction, or LAMB)")
        if self.max_grad_norm:
            departures.append(f"--max_grad_norm {self.max_grad_norm} (the original never clipped gradients)")
        if self.uses_lamb and (self.adam_beta1, self.adam_beta2) != ORIGINAL_LAMB_BETAS:
            departures.append(f"LAMB with betas ({self.adam_beta1}, {self.adam_beta2}) from --adam_beta1/--adam_beta2 "
                              f"(the original's LAMB always used {ORIGINAL_LAMB_BETAS})")
        if self.dataloader_drop_last is False:
            departures.append("--dataloader_drop_last False (the original always dropped the last incomplete "
                              "training batch)")
        return departures

    @property
    def masking_seed(self) -> int:
        """The seed of the dynamic masking (and of the packing's order): --data_seed when given, else --seed."""
        return self.data_seed if self.data_seed is not None else self.seed

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warmup steps of `num_training_steps`, from --warmup_steps or --warmup_ratio (see `warmup_steps_for`)."""
        return warmup_steps_for(num_training_steps, self.warmup_ratio, self.warmup_steps)


def warmup_steps_for(num_training_steps: int, warmup_ratio: Optional[float] = None, warmup_steps: float = 0) -> int:
    """Warmup length: `warmup_steps` >= 1 is a step count, 0 < `warmup_steps` < 1 a ratio (transformers 5's
    form), else `warmup_ratio` (the IPU recipes' flag); a ratio r gives ceil(num_training_steps * r), computed
    as the original computes it, in binary floating point: 10500 steps at 0.28 give 2941 (the product is
    2940.0000000000005).
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r} is invalid: must be >= 0")
    if warmup_steps >= 1:
        return int(warmup_steps)
    ratio = warmup_steps if warmup_steps > 0 else (warmup_ratio or 0.0)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"warmup_ratio={ratio!r} is invalid: must be in [0, 1]")
    return math.ceil(num_training_steps * ratio)
