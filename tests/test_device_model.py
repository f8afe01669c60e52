"""--device_model: a CPU run that takes a given GPU's decisions, read from one resolved device model."""

import math
import re

import pytest
import torch

from conftest import quickstart_argv, read_json, run_script
from ipu_trainer import IPUConfig, IPUTrainingArguments
from ipu_trainer.cli.startup import run_cli
from ipu_trainer.data.collators import pad_to_multiple_of_for
from ipu_trainer.run import precision as precision_module
from ipu_trainer.run.device_model import DEVICE_MODELS, device_model_named
from ipu_trainer.run.resolved_run import resolve_run
from ipu_trainer.training import mfu

ASKED_FOR = ("V100", "T4", "A10G", "L4", "A100", "H100", "H200", "B200")


def test_each_gpu_of_the_mfu_table_is_a_device_model_that_agrees_with_it_on_bfloat16():
    rows = {gpu.name: gpu for gpu in mfu._GPUS}
    assert sorted(model.title for model in DEVICE_MODELS) == sorted(rows)
    for model in DEVICE_MODELS:
        assert mfu._gpu_peaks(model.device_name) is rows[model.title], model
        assert model.native_bfloat16 == (rows[model.title].bf16 is not None), model
    assert all(device_model_named(name.lower()).name == name for name in ASKED_FOR)


def test_an_unknown_name_is_one_error_line_listing_the_names(tmp_path, capsys):
    assert run_cli(lambda: IPUTrainingArguments(output_dir=str(tmp_path), device_model="P100")) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --device_model P100 is not a known GPU: choose one of V100, ")
    assert all(name in line for name in ASKED_FOR)


@pytest.fixture
def no_cuda_queries(monkeypatch):
    """The GPU facts come from the model: any CUDA capability query fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA query was made")

    for name in ("is_bf16_supported", "get_device_name", "get_device_capability"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    monkeypatch.setattr(precision_module, "cpu_has_fast_bfloat16", refuse)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


@pytest.mark.parametrize("name, precision", [
    ("V100", "fp16"), ("T4", "fp16"), ("A100", "bf16"), ("H100", "bf16"), ("B200", "bf16"),
])
def test_the_runs_decisions_are_the_modelled_gpus(tmp_path, no_cuda_queries, name, precision):
    args = IPUTrainingArguments(output_dir=str(tmp_path), device_model=name.lower(), loss_scaling=1024,
                                report_to=[])
    config = IPUConfig(layers_per_ipu=[-1], optimizer_state_offchip=True, replicated_tensor_sharding=True)
    run = resolve_run(config, args)
    assert args.device.type == "cpu" and run.device_model.name == name
    assert args.device_model == name  # one spelling in the run record whatever the case given
    assert run.precision.mixed_precision == precision
    assert (run.precision.loss_scale, run.precision.dynamic_loss_scale) == ((1024.0, False) if precision == "fp16"
                                                                            else (None, False))
    assert run.offloads_optimizer_state and not run.shards_optimizer_state  # one process: nothing to shard over
    assert pad_to_multiple_of_for(run) == 8  # half precision on a GPU: tensor-core shapes
    loop = run.loop_arguments()
    assert loop.dataloader_pin_memory is False and loop.accelerator_config.non_blocking is True
    assert any(line.startswith("pinned host memory: none") for line in run.describe())
    # Without the model the same CPU run takes a CPU's decisions.
    plain = resolve_run(config, IPUTrainingArguments(output_dir=str(tmp_path), fp32=True, report_to=[]))
    assert not plain.offloads_optimizer_state and pad_to_multiple_of_for(plain) is None


def test_a_modelled_gpu_refuses_what_that_gpu_refuses(tmp_path, no_cuda_queries):
    args = IPUTrainingArguments(output_dir=str(tmp_path), device_model="T4", bf16=True, report_to=[])
    with pytest.raises(ValueError, match=r"--bf16 asks for bfloat16, but the modelled NVIDIA T4 \(Tesla T4\) has no"):
        resolve_run(IPUConfig(layers_per_ipu=[-1]), args)
    args = IPUTrainingArguments(output_dir=str(tmp_path), device_model="A100", fp16=True, report_to=[])
    assert resolve_run(IPUConfig(layers_per_ipu=[-1]), args).precision.mixed_precision == "fp16"


@pytest.mark.slow
def test_the_seed_config_on_a_modelled_v100_trains_in_float16_with_the_host_offloaded_optimizer(
        assets, tmp_path, monkeypatch, caplog):
    """The issue's crash: the seed ipu_config.json (optimizer_state_offchip) on a V100, one process, float16."""
    argv = [arg for arg in quickstart_argv("run_mlm", assets, tmp_path / "out", "--device_model", "V100",
                                           "--loss_scaling", "1024", "--logging_steps", "1", "--max_steps", "3")
            if arg != "--fp32"]
    with caplog.at_level("INFO"):
        run_script(monkeypatch, argv)
    log = "\n".join(record.getMessage() for record in caplog.records)
    assert re.search(r"CPU run modelling an NVIDIA V100 SXM2: .* no CUDA kernel runs", log)
    assert "precision: float16 (half precision: float16, the modelled NVIDIA V100 SXM2 has no native bfloat16)" in log
    assert "optimizer state: one full copy per process, in host memory" in log
    history = read_json(tmp_path / "out" / "trainer_state.json")["log_history"]
    steps = [entry for entry in history if "loss" in entry]
    assert len(steps) == 3 and all(math.isfinite(entry["loss"]) for entry in steps)
    assert "modelled_mfu" in steps[-1] and "mfu" not in steps[-1]
    assert "overflowed" not in log


@pytest.mark.parametrize("script", ["run_pretraining", "run_mlm", "run_clm"])
def test_every_script_takes_the_flag_with_the_ipu_flags(script, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_script(monkeypatch, [f"{script}.py", "--help"])
    assert exit_info.value.code == 0
    ipu_flags = capsys.readouterr().out.split("IPU flags (IPUTrainingArguments):", 1)[1].split("Common training", 1)[0]
    assert "--device_model" in ipu_flags
