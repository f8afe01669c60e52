"""--pipeline: a replica's layers over ipus_per_replica torchrun processes (gloo on the CPU) reach the weights of one
unpipelined process; the stages, the layout and its refusals, checkpoints and resume."""

import inspect
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForPreTraining, GPT2Config, RobertaConfig, Trainer, default_data_collator

from conftest import REPO, TINY_GPT2, free_port, make_args, quickstart_argv, read_json, run_script
from tiny import SEQ, masked_pairs, tiny_bert
from ipu_trainer import IPUConfig, IPUTrainer
from ipu_trainer.config.ipu_config import IncompatibleIPUConfigError
from ipu_trainer.models import BertForMaskedLMMaskedPositions, BertForPreTrainingMaskedPositions, GPT2LMHeadModelChunked
from ipu_trainer.models.masked_lm import RobertaForMaskedLMMaskedPositions
from ipu_trainer.models.stages import split_into_stages
from ipu_trainer.run.pipeline_layout import bubble_fraction, resolve_pipeline
from ipu_trainer.run.placement import Placement
from ipu_trainer.training.pipeline import check_checkpoint_layout, concatenate_batches

TINY = ("vocab_size=2000,hidden_size=32,num_hidden_layers=4,num_attention_heads=2,intermediate_size=64,"
        "max_position_embeddings=64,hidden_dropout_prob=0,attention_probs_dropout_prob=0")  # dropout draws differ per stage
PLACEMENT = ("layers_per_ipu=[2 2],ipus_per_replica=2,gradient_accumulation_steps=4,replicated_tensor_sharding=false,"
             "optimizer_state_offchip=false,recompute_checkpoint_every_layer=false")


# ---- the stages, in one process -------------------------------------------------------------------------------------


def _run_stages(stages, batch):
    hidden = None
    for stage in stages:
        args, kwargs = stage.stage_inputs(batch)
        hidden = stage(*(args or (hidden,)), **kwargs)
    return hidden


def _bert_config():
    config = tiny_bert().config
    config.num_hidden_layers, config.max_num_masked_tokens = 4, SEQ
    return config


@pytest.mark.parametrize("model_class", [BertForPreTrainingMaskedPositions, BertForMaskedLMMaskedPositions,
                                         RobertaForMaskedLMMaskedPositions, GPT2LMHeadModelChunked])
def test_the_stages_in_a_row_compute_the_model(model_class):
    torch.manual_seed(0)
    if model_class is GPT2LMHeadModelChunked:
        model = model_class(GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=2, n_positions=SEQ, resid_pdrop=0,
                                       embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0))
        ids = torch.randint(0, 64, (3, SEQ))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    else:
        config = _bert_config()
        if model_class is RobertaForMaskedLMMaskedPositions:
            config = RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=SEQ + 2, hidden_dropout_prob=0,
                                   attention_probs_dropout_prob=0, pad_token_id=1)
            config.max_num_masked_tokens = SEQ
        model = model_class(config)
        batch = default_data_collator([masked_pairs(4)[i] for i in range(4)])
        if model_class is not BertForPreTrainingMaskedPositions:
            batch.pop("next_sentence_label")
            batch.pop("token_type_ids")
    stages = split_into_stages(model, [0, 3, 1])  # an embeddings-only first stage, as [0, 4, 4, 4] on the IPU
    model.train()
    torch.testing.assert_close(_run_stages(stages, batch), model(**batch).loss, rtol=0, atol=1e-6)
    model.eval()
    with torch.no_grad():
        expected, got = model(**batch), _run_stages(stages, batch)
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=name)
    # Every parameter is in exactly one stage, but for the tied embedding / output projection: in the first and last.
    owners = {}
    for index, stage in enumerate(stages):
        for parameter in stage.parameters():
            owners.setdefault(id(parameter), []).append(index)
    assert {id(parameter) for parameter in model.parameters()} == set(owners)
    assert sorted(tuple(stages_) for stages_ in owners.values() if len(stages_) > 1) == [(0, 2)]


def test_a_model_the_stages_cannot_cut_is_refused():
    with pytest.raises(ValueError, match="--pipeline cannot cut BertForPreTraining into stages"):
        split_into_stages(tiny_bert(), [1, 1])


def test_batches_of_different_lengths_are_padded_to_one():
    parts = [{"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 3, dtype=torch.long)},
             {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.ones(2, 5, dtype=torch.long)}]
    batch = concatenate_batches(parts)
    assert batch["input_ids"].shape == (4, 5) and batch["input_ids"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][1].tolist() == [1, 1, 1, -100, -100]


@pytest.mark.parametrize("elsewhere", [True, False])
def test_a_process_with_finite_gradients_skips_the_update_when_another_overflowed(monkeypatch, elsewhere):
    """The float16 overflow flag is agreed: the all-reduce (faked here) says another process overflowed, so this one's
    GradScaler skips the update and lowers its scale as that process's does."""
    from ipu_trainer.training import pipeline as module

    parameter = torch.nn.Parameter(torch.ones(3))
    parameter.grad = torch.full((3,), 4.0)
    process = SimpleNamespace(_parameters=lambda: [parameter], device=torch.device("cpu"))
    monkeypatch.setattr(module.dist, "all_reduce", lambda flag, **kwargs: flag.fill_(1.0 if elsewhere else 0.0))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.zeros(()))
    module.Pipeline._agree_on_overflow(process)
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scaler.step(optimizer)
    scaler.update()
    if elsewhere:
        assert parameter.tolist() == [1.0, 1.0, 1.0] and scaler.get_scale() == 2.0
    else:
        assert parameter.tolist() == [0.0, 0.0, 0.0] and scaler.get_scale() == 4.0


# ---- the layout, before anything loads ------------------------------------------------------------------------------


def _args(**values):
    defaults = dict(pipeline="1F1B", world_size=2, fsdp=None, dataloader_drop_last=None, torch_compile=False)
    return SimpleNamespace(**{**defaults, **values})


def _config(**values):
    return IPUConfig(**{"layers_per_ipu": [2, 2], **values})


MODEL = SimpleNamespace(model_type="bert")


def test_the_layout_of_two_replicas_of_two_stages():
    layout = resolve_pipeline(_args(world_size=4), _config(inference_layers_per_ipu=[1, 3]), MODEL, 4)
    assert (layout.stages, layout.data_parallel, layout.layers_per_stage, layout.eval_layers_per_stage) == (
        2, 2, (2, 2), (1, 3))
    assert [layout.stage_of(rank) for rank in range(4)] == [0, 1, 0, 1]
    assert [layout.group_of(rank) for rank in range(4)] == [0, 0, 1, 1]
    assert resolve_pipeline(_args(pipeline=None), _config(), MODEL, 4) is None


@pytest.mark.parametrize("args, config, model, message", [
    (_args(world_size=3), _config(), MODEL, "3 process.es. cannot hold whole pipelines of ipus_per_replica=2 stages: "
     "start a multiple of 2"),
    (_args(world_size=2), _config(inference_layers_per_ipu=[1, 1, 1, 1]), MODEL,
     "inference_ipus_per_replica=4 .* multiple of 4"),
    (_args(), _config(layers_per_ipu=[-1]), MODEL, "needs ipus_per_replica >= 2"),
    (_args(), _config(), SimpleNamespace(model_type="distilbert"), "cannot cut model type 'distilbert'"),
    (_args(fsdp="full_shard"), _config(), MODEL, "--pipeline with --fsdp is not supported"),
    (_args(world_size=4), _config(replicated_tensor_sharding=True), MODEL,
     "--pipeline with replicated_tensor_sharding=true is not supported"),
    (_args(dataloader_drop_last=False), _config(), MODEL, "--dataloader_drop_last False"),
    (_args(torch_compile=True), _config(), MODEL, "--torch_compile"),
    (_args(pipeline="GPipe", world_size=4), _config(), MODEL, "--pipeline with GPipe and several data-parallel"),
])
def test_what_cannot_be_pipelined_is_refused_in_one_line(args, config, model, message):
    with pytest.raises(ValueError, match=message) as refused:
        resolve_pipeline(args, config, model, 4)
    assert "\n" not in str(refused.value)


def test_replicated_tensor_sharding_with_one_pipeline_has_no_effect_and_is_not_refused():
    assert resolve_pipeline(_args(world_size=2), _config(replicated_tensor_sharding=True), MODEL, 4).data_parallel == 1


def test_each_stage_process_reads_its_share_of_the_pipelines_batch():
    placement = Placement.for_training(_config(replication_factor=2, gradient_accumulation_steps=4), 2, 2,
                                       pipeline_stages=2)
    assert (placement.micro_batches_per_update, placement.samples_per_step, placement.process_batch_size) == (4, 16, 4)
    with pytest.raises(IncompatibleIPUConfigError, match="cannot be read in 2 equal parts"):
        Placement.for_training(_config(gradient_accumulation_steps=1), 1, 1, pipeline_stages=2)


def test_the_bubble_the_schedules_predict():
    assert bubble_fraction("1F1B", 2, 4) == bubble_fraction("GPipe", 2, 4) == pytest.approx(1 / 5)
    assert bubble_fraction("1F1B", 4, 512) == pytest.approx(3 / 515)


def test_a_checkpoint_resumes_only_on_its_own_layout(tmp_path):
    record = {"stages": 2, "layers_per_stage": [2, 2], "world_size": 2}
    check_checkpoint_layout(str(tmp_path), None)  # unpipelined, resumed unpipelined
    with pytest.raises(ValueError, match="written without --pipeline"):
        check_checkpoint_layout(str(tmp_path), record)
    (tmp_path / "pipeline.json").write_text(json.dumps(record))
    check_checkpoint_layout(str(tmp_path), {**record, "world_size": 4})  # more data-parallel pipelines: the same parts
    with pytest.raises(ValueError, match="written with --pipeline"):
        check_checkpoint_layout(str(tmp_path), None)
    with pytest.raises(ValueError, match="another layout"):
        check_checkpoint_layout(str(tmp_path), {**record, "layers_per_stage": [1, 3]})


# ---- private upstream touchpoints --------------------------------------------------------------------------------------


def test_upstream_measures_the_gradient_norm_through_the_overridden_methods(tmp_path, monkeypatch):
    """IPUTrainer overrides transformers' private `_clip_grad_norm` / `_get_grad_norm` so that a pipelined process
    clips and logs the norm over every stage; if upstream renames or stops calling them, this fails."""
    assert list(inspect.signature(Trainer._clip_grad_norm).parameters) == ["self", "model"]
    assert list(inspect.signature(Trainer._get_grad_norm).parameters) == ["self", "model", "grad_norm"]
    called = []
    for name in ("_clip_grad_norm", "_get_grad_norm"):
        original = getattr(IPUTrainer, name)
        monkeypatch.setattr(IPUTrainer, name, lambda self, *a, _name=name, _original=original, **k: (
            called.append(_name), _original(self, *a, **k))[-1])
    args = make_args(tmp_path, max_steps=1, max_grad_norm=1.0, save_strategy="no")
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(), args=args, data_collator=default_data_collator,
                         train_dataset=masked_pairs(4))
    trainer.train()
    assert called == ["_clip_grad_norm", "_get_grad_norm"]


def test_upstream_does_not_prepare_a_model_handed_to_it_as_the_wrapped_one(tmp_path, monkeypatch):
    """IPUTrainer.train hands the loop a pipelined process's stage as `model_wrapped`; upstream then prepares only the
    optimizer (no DDP over every process around the whole model). If upstream prepares the model anyway, this fails."""

    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner = model

        def forward(self, **inputs):
            return self.inner(**inputs)

    args = make_args(tmp_path, max_steps=1, save_strategy="no")
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(), args=args, data_collator=default_data_collator,
                         train_dataset=masked_pairs(4))
    prepared = []
    original = trainer.accelerator.prepare_model
    monkeypatch.setattr(trainer.accelerator, "prepare_model", lambda model, *a, **k: (
        prepared.append(model), original(model, *a, **k))[-1])
    trainer.model_wrapped = Wrapper(trainer.model)
    trainer.train()
    assert prepared == [] and trainer.state.global_step == 1


# ---- torchrun, run_pretraining.py ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretraining_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "data"
    masked_pairs(96).save_to_disk(str(path))
    return str(path)


def pretraining_argv(data, tokenizer, output_dir, *extra, replicas=1, placement=""):
    return [
        "run_pretraining.py", "--model_type", "bert", "--config_overrides", TINY, "--tokenizer_name", tokenizer,
        "--dataset_path", data, "--is_already_preprocessed", "--is_already_masked", "--ipu_config_name", REPO,
        "--ipu_config_overrides", f"{PLACEMENT},replication_factor={replicas}{placement}",
        "--per_device_train_batch_size", "2", "--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate",
        "0.3", "--max_steps", "3", "--do_train", "--do_eval", "--max_eval_samples", "8", "--save_strategy", "steps",
        "--save_steps", "2", "--output_dir", str(output_dir), "--report_to", "none", "--disable_tqdm", "true",
        "--seed", "7", "--fp32", "--logging_steps", "1", *extra,
    ]


def torchrun(processes, argv, check=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), os.path.join(REPO, argv[0]), *argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def relative_difference(dir_a, dir_b) -> float:
    """||a - b|| / ||a|| over every weight of the two saved models."""
    a, b = (load_file(os.path.join(folder, "model.safetensors")) for folder in (dir_a, dir_b))
    assert a.keys() == b.keys()
    difference = sum(((a[name] - b[name]).double() ** 2).sum() for name in a).sqrt()
    return float(difference / sum((a[name].double() ** 2).sum() for name in a).sqrt())


def losses(output_dir):
    return [entry["loss"] for entry in read_json(os.path.join(output_dir, "trainer_state.json"))["log_history"]
            if "loss" in entry]


@pytest.fixture(scope="module")
def unpipelined(pretraining_data, tokenizer_dir, tmp_path_factory):
    """One process, without --pipeline, for 1 and 2 replicas: the references."""
    monkeypatch = pytest.MonkeyPatch()
    outputs = {}
    try:
        for replicas in (1, 2):
            outputs[replicas] = tmp_path_factory.mktemp(f"unpipelined{replicas}") / "out"
            run_script(monkeypatch, pretraining_argv(pretraining_data, tokenizer_dir, outputs[replicas],
                                                     replicas=replicas))
    finally:
        monkeypatch.undo()
    return outputs


def test_packing_is_refused_before_anything_is_written(pretraining_data, tokenizer_dir, tmp_path, monkeypatch):
    argv = pretraining_argv(pretraining_data, tokenizer_dir, tmp_path / "out", "--pipeline", "--packing")
    with pytest.raises(ValueError, match="--pipeline with --packing is not supported"):
        run_script(monkeypatch, argv)
    assert not (tmp_path / "out").exists()


def test_dynamically_padded_lines_are_refused_before_anything_is_written(assets, tmp_path, monkeypatch):
    argv = quickstart_argv("run_mlm", assets, tmp_path / "out", "--pipeline", "--line_by_line")
    with pytest.raises(ValueError, match="--pipeline with --line_by_line batches padded to their longest line"):
        run_script(monkeypatch, argv)
    assert not (tmp_path / "out").exists()
    # Padded to max_seq_length, every batch has the one length the stages were built for: not refused here.
    with pytest.raises(Exception) as raised:
        run_script(monkeypatch, [*argv, "--pad_to_max_length"])
    assert "--line_by_line batches padded" not in str(raised.value)


@pytest.mark.slow
def test_two_stages_on_two_processes_reach_the_weights_of_one_process(
        pretraining_data, tokenizer_dir, unpipelined, tmp_path):
    """The issue's "done when": ipus_per_replica=2, layers_per_ipu=[2 2], accumulation 4, 3 steps of SGD (with momentum),
    here with the GPipe schedule (the 4-process test runs 1F1B). Evaluation runs through another split ([1 3]); a resume
    from checkpoint-2 reaches the same weights and momentum."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    argv = pretraining_argv(pretraining_data, tokenizer_dir, straight, "--pipeline", "GPipe",
                            placement=",inference_layers_per_ipu=[1 3]")
    torchrun(2, argv)
    assert relative_difference(unpipelined[1], straight) <= 1e-4
    assert losses(straight) == pytest.approx(losses(unpipelined[1]), rel=1e-5)
    assert read_json(straight / "eval_results.json")["eval_loss"] == pytest.approx(
        read_json(unpipelined[1] / "eval_results.json")["eval_loss"], rel=1e-5)
    # One plain transformers checkpoint; each stage's optimizer part in the checkpoints, marked complete.
    assert type(AutoModelForPreTraining.from_pretrained(straight)).__name__ == "BertForPreTraining"
    checkpoint = straight / "checkpoint-2"
    for name in ("optimizer.pt", "optimizer_stage1.pt", "pipeline.json", "checkpoint_complete.json"):
        assert (checkpoint / name).is_file(), name
    assert {"optimizer.pt", "optimizer_stage1.pt"} <= set(read_json(checkpoint / "checkpoint_complete.json")["files"])

    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    result = torchrun(2, pretraining_argv(pretraining_data, tokenizer_dir, resumed, "--pipeline", "GPipe",
                                          placement=",inference_layers_per_ipu=[1 3]"))
    assert "Resuming from" in result.stdout
    assert result.stdout.count("{'loss'") == 1  # step 3 only
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6)
    assert relative_difference(straight, resumed) <= 1e-6
    for part in ("optimizer.pt", "optimizer_stage1.pt"):
        a, b = (torch.load(folder / "checkpoint-3" / part, weights_only=True) for folder in (straight, resumed))
        assert a["state"] and a["state"].keys() == b["state"].keys()
        for index in a["state"]:
            torch.testing.assert_close(b["state"][index]["momentum_buffer"], a["state"][index]["momentum_buffer"])


@pytest.mark.slow
def test_two_replicas_of_two_stages_on_four_processes_reach_the_weights_of_one_process(
        pretraining_data, tokenizer_dir, unpipelined, tmp_path):
    torchrun(4, pretraining_argv(pretraining_data, tokenizer_dir, tmp_path, "--pipeline", replicas=2))  # 1F1B
    assert relative_difference(unpipelined[2], tmp_path) <= 1e-4
    assert losses(tmp_path) == pytest.approx(losses(unpipelined[2]), rel=1e-5)
    assert read_json(tmp_path / "eval_results.json")["eval_loss"] == pytest.approx(
        read_json(unpipelined[2] / "eval_results.json")["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_float16_with_clipping_on_two_stages_reaches_the_weights_of_one_process(pretraining_data, tokenizer_dir, tmp_path,
                                                                                monkeypatch):
    """A modelled V100: float16 autocast in every stage, the GradScaler's scale on the stages before the last (whose
    gradients carry it), and clipping at a norm below the gradients' norm, which is every stage's."""
    extra = ("--device_model", "V100", "--loss_scaling", "1024", "--max_grad_norm", "0.5")
    unpipelined, pipelined = tmp_path / "unpipelined", tmp_path / "pipelined"
    argv = [value for value in pretraining_argv(pretraining_data, tokenizer_dir, unpipelined, *extra) if value != "--fp32"]
    run_script(monkeypatch, argv)
    argv = [value for value in pretraining_argv(pretraining_data, tokenizer_dir, pipelined, *extra, "--pipeline")
            if value != "--fp32"]
    torchrun(2, argv)
    norms = [[entry["grad_norm"] for entry in read_json(folder / "trainer_state.json")["log_history"]
              if "grad_norm" in entry] for folder in (unpipelined, pipelined)]
    assert min(norms[0]) > 0.5 and norms[1] == pytest.approx(norms[0], rel=1e-3)
    assert relative_difference(unpipelined, pipelined) <= 1e-4


@pytest.mark.slow
def test_gpt2_on_two_stages_reaches_the_weights_of_one_process(assets, tmp_path, monkeypatch):
    """run_clm.py: GPT-2's blocks split [1 1], its LM head tied to the token embedding across the two stages."""
    def argv(output_dir, *extra):
        return quickstart_argv("run_clm", assets, output_dir, "--ipu_config_overrides", PLACEMENT.replace(
            "[2 2]", "[1 1]") + ",replication_factor=1", "--config_overrides",
            TINY_GPT2 + ",resid_pdrop=0,embd_pdrop=0,attn_pdrop=0", "--per_device_train_batch_size", "2",
            "--optim", "sgd", "--learning_rate", "0.5", "--max_steps", "3", "--logging_steps", "1", *extra)

    run_script(monkeypatch, argv(tmp_path / "unpipelined"))
    torchrun(2, argv(tmp_path / "pipelined", "--pipeline"))
    assert losses(tmp_path / "pipelined") == pytest.approx(losses(tmp_path / "unpipelined"), rel=1e-5)
    assert relative_difference(tmp_path / "unpipelined", tmp_path / "pipelined") <= 1e-4


@pytest.mark.slow
def test_a_number_of_processes_that_is_not_a_multiple_of_the_stages_is_refused_before_loading(tmp_path):
    # The check needs only the IPU config and the process count: it comes before the (here absent) data and tokenizer.
    argv = pretraining_argv("unused", "unused", tmp_path / "out", "--pipeline")
    argv[argv.index("--dataset_path")] = "--dataset_name"
    result = torchrun(3, argv, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --pipeline: 3 process(es) cannot hold whole pipelines of ipus_per_replica=2 stages: "
                      "start a multiple of 2 processes (torchrun --nproc_per_node 2 ...)"]
    assert not (tmp_path / "out").exists()


def test_a_schedule_that_calls_the_last_stage_other_than_once_per_micro_batch_stops_the_run():
    """The loss and evaluation outputs are read from the schedule's last calls (its first run adds one for shape
    inference): another count from a future torch stops the run instead of mixing in a placeholder's output."""
    from ipu_trainer.training.pipeline import _check_calls

    _check_calls(4, 4, "loss function")
    _check_calls(5, 4, "loss function")
    for calls in (3, 6):
        with pytest.raises(RuntimeError, match="called the loss function"):
            _check_calls(calls, 4, "loss function")
