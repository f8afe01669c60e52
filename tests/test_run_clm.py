"""run_clm.py end to end on CPU: a tiny GPT-2 from a config, a byte-level BPE tokenizer and text made on the
machine, the original flags and the repository's ipu_config.json."""

import dataclasses
import os
import sys

import pytest
import torch
from datasets import load_dataset
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import read_json, run_script, script_module
from ipu_trainer import IPUConfig, IPUTrainingArguments
from ipu_trainer.cli.datasets import load_raw_datasets
from ipu_trainer.cli.script_args import parse_script_args
from ipu_trainer.run.resolved_run import effective_ipu_config
from ipu_trainer.training.metrics import causal_lm_predictions, masked_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import run_clm  # noqa: E402

BLOCK = 64
TINY_GPT2 = f"vocab_size=1000,n_embd=64,n_layer=2,n_head=2,n_positions={BLOCK},bos_token_id=0,eos_token_id=0"
# The repository's ipu_config.json (4 replicas x 4 IPUs, recomputation on) brought down to one CPU, with the
# vocabulary projection computed in 2 chunks.
ONE_CPU = ("layers_per_ipu=[-1],ipus_per_replica=1,replication_factor=1,gradient_accumulation_steps=2,"
           "embedding_serialization_factor=2")
SEED = 7




def clm_argv(assets, output_dir, *extra, model=("--model_type", "gpt2", "--config_overrides", TINY_GPT2)):
    return [
        "run_clm.py", *model, "--tokenizer_name", assets["bpe_tokenizer"], "--train_file", assets["train_file"],
        "--validation_file", assets["validation_file"], "--block_size", str(BLOCK),
        "--ipu_config_name", REPO, "--ipu_config_overrides", ONE_CPU,
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_train_samples", "400",
        "--max_eval_samples", "48", "--learning_rate", "5e-3", "--output_dir", str(output_dir), "--report_to", "none",
        "--disable_tqdm", "true", "--seed", str(SEED), "--fp32", *extra,
    ]


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """One short training run, and an evaluation of the same initial weights (same seed) before it."""
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("clm")
    try:
        run_script(monkeypatch, clm_argv(assets, root / "before", "--do_eval"))
        run_script(monkeypatch, clm_argv(assets, root / "out", "--do_train", "--do_eval", "--max_steps", "30",
                                  "--save_steps", "15", "--logging_steps", "5"))
    finally:
        monkeypatch.undo()
    return root


def test_tiny_gpt2_trains_and_writes_results(trained):
    out = trained / "out"
    for name in ("train_results.json", "eval_results.json", "all_results.json", "trainer_state.json", "README.md",
                 "ipu_config.json", "config.json", "model.safetensors", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-15" / "ipu_config.json").is_file() and (out / "checkpoint-30").is_dir()

    results = read_json(out / "eval_results.json")
    assert {"eval_loss", "perplexity", "eval_samples", "eval_accuracy"} <= set(results)
    assert results["eval_samples"] == 48
    before = read_json(trained / "before" / "eval_results.json")
    assert results["perplexity"] < 0.5 * before["perplexity"]
    assert results["eval_accuracy"] > before["eval_accuracy"]
    assert read_json(out / "config.json")["architectures"] == ["GPT2LMHeadModel"]
    assert read_json(out / "ipu_config.json")["embedding_serialization_factor"] == 2


def test_lm_head_stays_tied_through_chunked_training(trained):
    out = trained / "out"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # saved once, as the embedding it is tied to
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is model.transformer.wte.weight
    initial = AutoModelForCausalLM.from_pretrained(out / "checkpoint-15")
    assert not torch.equal(initial.transformer.wte.weight, model.transformer.wte.weight)  # it did train


def test_checkpoint_reloads_with_auto_class_and_reproduces_eval_loss_and_accuracy(trained, assets):
    out = trained / "out"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    tokenizer = AutoTokenizer.from_pretrained(out)
    raw = load_dataset("text", data_files={"validation": assets["validation_file"]}, keep_linebreaks=True)
    blocks = script_module("run_clm").tokenize_for_causal_lm(raw, tokenizer, BLOCK)["validation"].select(range(48)).with_format("torch")
    losses, predictions, labels = [], [], []
    with torch.no_grad():
        for start in range(0, 48, 16):
            batch = blocks[start : start + 16]
            output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            losses.append(output.loss.item())
            p, l = causal_lm_predictions(output.logits, batch["labels"])
            predictions.append(p), labels.append(l)
    results = read_json(out / "eval_results.json")
    assert results["eval_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert results["eval_accuracy"] == pytest.approx(masked_accuracy(torch.cat(predictions), torch.cat(labels)))


def test_keep_linebreaks_reaches_the_text_loader(assets, monkeypatch):
    monkeypatch.setattr(sys, "argv", clm_argv(assets, "unused", "--keep_linebreaks", "false"))
    model_args, data_args, _ = parse_script_args(run_clm.ModelArguments, run_clm.DataTrainingArguments)
    assert data_args.keep_linebreaks is False
    for keep in (True, False):
        raw = load_raw_datasets(data_args, model_args, text_builder_kwargs={"keep_linebreaks": keep})
        assert raw["train"][0]["text"].endswith("\n") is keep


# ---- command line ----------------------------------------------------------------------------------------

ORIGINAL_FLAGS = [
    "model_name_or_path", "model_type", "config_overrides", "config_name", "tokenizer_name", "cache_dir",
    "use_fast_tokenizer", "model_revision", "use_auth_token", "low_cpu_mem_usage", "torch_dtype",
    "dataset_name", "dataset_config_name", "train_file", "validation_file", "max_train_samples", "max_eval_samples",
    "block_size", "overwrite_cache", "validation_split_percentage", "preprocessing_num_workers", "keep_linebreaks",
    "ipu_config_name", "ipu_config_overrides", "n_ipu", "fp32", "lamb", "lamb_no_bias_correction", "loss_scaling",
    "auto_loss_scaling", "dataloader_mode", "compile_only", "pad_on_batch_axis", "gradient_accumulation_steps",
    "gradient_checkpointing",
]


def test_help_lists_every_flag(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["run_clm.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        run_clm.main()
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ORIGINAL_FLAGS:
        assert f"--{flag} " in help_text or f"--{flag}\n" in help_text, flag


def test_defaults_match_the_original():
    data_defaults = {f.name: f.default for f in dataclasses.fields(run_clm.DataTrainingArguments)}
    assert data_defaults == {
        "dataset_name": None, "dataset_config_name": None, "train_file": None, "validation_file": None,
        "max_train_samples": None, "max_eval_samples": None, "block_size": None, "overwrite_cache": False,
        "validation_split_percentage": 5, "preprocessing_num_workers": None, "keep_linebreaks": True,
        "streaming": False,  # the transformers examples' flag, beyond the original's
    }
    model_defaults = {f.name: f.default for f in dataclasses.fields(run_clm.ModelArguments)}
    assert model_defaults["torch_dtype"] is None and model_defaults["low_cpu_mem_usage"] is False
    assert model_defaults["use_fast_tokenizer"] is True and model_defaults["model_revision"] == "main"


def test_readme_command_parses(monkeypatch):
    command = (
        "run_clm.py --model_name_or_path gpt2 --ipu_config_name Graphcore/gpt2-small-ipu --dataset_name wikitext "
        "--dataset_config_name wikitext-2-raw-v1 --do_train --do_eval --num_train_epochs 30 "
        "--dataloader_num_workers 64 --per_device_train_batch_size 1 --per_device_eval_batch_size 1 "
        "--gradient_accumulation_steps 128 --output_dir /tmp/clm_gpt2 --logging_steps 1 --learning_rate 1e-5 "
        "--lr_scheduler_type linear --loss_scaling 16384 --weight_decay 0.01 --warmup_ratio 0.1 "
        "--config_overrides=activation_function=gelu --dataloader_drop_last --n_ipu 16"
    )
    monkeypatch.setattr(sys, "argv", command.split())
    model_args, data_args, training_args = parse_script_args(run_clm.ModelArguments, run_clm.DataTrainingArguments)
    assert isinstance(training_args, IPUTrainingArguments)
    assert model_args.config_overrides == "activation_function=gelu" and data_args.dataset_name == "wikitext"
    assert training_args.n_ipu == 16 and training_args.loss_scaling == 16384
    # A 4-IPU pipeline like Graphcore/gpt2-small-ipu: --n_ipu 16 makes 4 replicas, the flag sets the accumulation.
    effective = effective_ipu_config(IPUConfig(layers_per_ipu=[-1, -1, -1, -1]), training_args)
    assert (effective.replication_factor, effective.gradient_accumulation_steps) == (4, 128)
