"""Precision is resolved once per run and applied by accelerate: CUDA facts are simulated on the CPU."""

import pytest
import torch
from transformers import default_data_collator

from ipu_trainer import IPUConfig, IPUTrainer, IPUTrainingArguments
from ipu_trainer.run import precision as precision_module
from ipu_trainer.run.precision import (
    DEFAULT_LOSS_SCALE,
    DYNAMIC_GROWTH_INTERVAL,
    Precision,
    StaticLossScaler,
    cpu_has_fast_bfloat16,
    resolve_precision,
)
from tiny import masked_pairs, tiny_bert

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


def resolve(device, fp32=False, fp16=False, bf16=False, loss_scaling=None, auto_loss_scaling=False):
    return resolve_precision(device, fp32, fp16, bf16, loss_scaling, auto_loss_scaling)


@pytest.fixture
def gpu(monkeypatch):
    """A GPU whose bfloat16 support the test sets; name for messages."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)

    def with_bfloat16(native: bool):
        monkeypatch.setattr(precision_module, "cuda_has_native_bfloat16", lambda: native)

    return with_bfloat16


def test_half_precision_on_a_gpu_with_bfloat16_is_bfloat16_and_ignores_the_loss_scale(gpu):
    gpu(True)
    precision = resolve(CUDA, loss_scaling=16384)
    assert precision.mixed_precision == "bf16" and precision.loss_scale is None
    assert precision.grad_scaler("cuda") is None


def test_half_precision_on_a_gpu_without_bfloat16_is_float16_with_the_recipes_static_scale(gpu):
    """A V100/T4 must not pick emulated bfloat16: it takes float16 and the recipe's --loss_scaling 16384."""
    gpu(False)
    precision = resolve(CUDA, loss_scaling=16384)
    assert (precision.mixed_precision, precision.loss_scale, precision.dynamic_loss_scale) == ("fp16", 16384, False)
    assert resolve(CUDA, loss_scaling=16384, auto_loss_scaling=True).dynamic_loss_scale
    default = resolve(CUDA)
    assert (default.loss_scale, default.dynamic_loss_scale) == (DEFAULT_LOSS_SCALE, True)
    scaler = precision.grad_scaler("cpu")  # the same GradScaler accelerate drives, built on the CPU for the test
    assert scaler.get_scale() == 16384 and isinstance(scaler, StaticLossScaler)
    assert default.grad_scaler("cpu").get_growth_interval() == DYNAMIC_GROWTH_INTERVAL


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_an_overflow_halves_a_dynamic_scale_and_leaves_a_static_one(dynamic):
    scaler = Precision("fp16", "test", loss_scale=1024.0, dynamic_loss_scale=dynamic).grad_scaler("cpu")
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scaler.scale(param.sum()).backward()
    param.grad[0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(param.detach(), torch.ones(3))  # skipped either way
    assert scaler.get_scale() == (512.0 if dynamic else 1024.0)


def test_explicit_requests_and_their_refusals(gpu, monkeypatch):
    gpu(False)
    with pytest.raises(ValueError, match=r"--bf16 asks for bfloat16, but this GPU \(Tesla V100-SXM2-16GB\)"):
        resolve(CUDA, bf16=True)
    gpu(True)
    assert resolve(CUDA, fp16=True).mixed_precision == "fp16"
    with pytest.raises(ValueError, match="--fp16 asks for float16 autocast, which needs a GPU"):
        resolve(CPU, fp16=True)
    assert resolve(CUDA, fp32=True).mixed_precision == "no"


def test_accelerate_launch_environment_is_one_request_not_a_second_autocast(gpu, monkeypatch):
    gpu(True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve(CUDA).mixed_precision == "fp16"
    assert resolve(CUDA, fp32=True).mixed_precision == "no"  # the command line wins
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` sets by default
    assert resolve(CUDA).mixed_precision == "bf16"


def test_cpu_half_precision_follows_native_bfloat16(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(precision_module, "cpu_has_fast_bfloat16", lambda: True)
    assert resolve(CPU).mixed_precision == "bf16"
    monkeypatch.setattr(precision_module, "cpu_has_fast_bfloat16", lambda: False)
    assert resolve(CPU).mixed_precision == "no"
    assert resolve(CPU, bf16=True).mixed_precision == "bf16"  # forced, with a warning


def test_the_trainer_hands_the_precision_to_accelerate_once(tmp_path, monkeypatch):
    """With ACCELERATE_MIXED_PRECISION=bf16 in the environment the run is bfloat16, applied by accelerate's autocast
    alone: the trainer adds no autocast of its own, and --fp32 turns the environment's request off."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    seen = []

    def record_autocast(module, inputs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    for fp32, expected in ((False, "bf16"), (True, "no")):
        args = IPUTrainingArguments(output_dir=str(tmp_path / str(fp32)), report_to=[], use_cpu=True, fp32=fp32,
                                    max_steps=1, per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True)
        model = tiny_bert()
        trainer = IPUTrainer(model=model, ipu_config=IPUConfig(layers_per_ipu=[-1]), args=args,
                             data_collator=default_data_collator, train_dataset=masked_pairs(4))
        assert trainer.args.mixed_precision == expected and trainer.accelerator.mixed_precision == expected
        handle = model.bert.encoder.register_forward_pre_hook(record_autocast)
        seen.clear()
        trainer.train()
        handle.remove()
        assert seen == [(expected == "bf16", torch.bfloat16 if expected == "bf16" else seen[0][1])]
        assert trainer.autocast_smart_context_manager().__class__.__name__ == "nullcontext"


# ---- Private upstream touchpoints ---------------------------------------------------------------------------


def test_native_bfloat16_query_exists_in_this_torch():
    """precision.cpu_has_fast_bfloat16 reads torch.cpu._is_avx512_bf16_supported and _is_amx_tile_supported."""
    assert isinstance(torch.cpu._is_avx512_bf16_supported(), bool)
    assert isinstance(torch.cpu._is_amx_tile_supported(), bool)
    assert isinstance(cpu_has_fast_bfloat16(), bool)


def test_precision_describes_itself_for_the_start_up_log():
    text = Precision("fp16", "half precision: float16, this GPU has no native bfloat16", 16384.0, False).describe()
    assert "float16" in text and "static loss scale 16384" in text
