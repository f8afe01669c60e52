"""run_pretraining.py end to end on CPU: tiny BERT, text made on the machine, the original flags."""

import math
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import AutoModelForPreTraining, HfArgumentParser

from conftest import assert_whole_words_masked, read_json, recorded_batches, run_script
from ipu_trainer import IPUConfig, IPUTrainingArguments
from ipu_trainer.run.resolved_run import effective_ipu_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import run_pretraining  # noqa: E402

TINY_BERT = "vocab_size=2000,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,max_position_embeddings=64"
ONE_CPU = "layers_per_ipu=[-1],ipus_per_replica=1,replication_factor=1,gradient_accumulation_steps=2"




def pretraining_argv(assets, output_dir, *extra):
    return [
        "run_pretraining.py", "--model_type", "bert", "--config_overrides", TINY_BERT,
        "--tokenizer_name", assets["tokenizer"], "--train_file", assets["train_file"],
        "--validation_file", assets["validation_file"], "--max_seq_length", "64",
        "--ipu_config_name", REPO, "--ipu_config_overrides", ONE_CPU + ",recompute_checkpoint_every_layer=false",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_train_samples", "400",
        "--max_eval_samples", "48", "--learning_rate", "3e-3", "--output_dir", str(output_dir), "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "7", *extra,
    ]


def test_pretraining_from_text_trains_and_writes_results(assets, tmp_path, monkeypatch):
    before = tmp_path / "before"
    run_script(monkeypatch, pretraining_argv(assets, before, "--do_eval"))
    perplexity_before = read_json(before / "eval_results.json")["perplexity"]

    out = tmp_path / "out"
    run_script(monkeypatch, pretraining_argv(assets, out, "--do_train", "--do_eval", "--max_steps", "40",
                                      "--save_steps", "20", "--logging_steps", "5"))
    for name in ("train_results.json", "eval_results.json", "all_results.json", "trainer_state.json", "README.md",
                 "ipu_config.json", "config.json", "model.safetensors", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-20" / "ipu_config.json").is_file()
    assert (out / "checkpoint-40").is_dir()

    eval_results = read_json(out / "eval_results.json")
    assert {"eval_loss", "perplexity", "eval_samples", "eval_mlm_accuracy", "eval_nsp_accuracy"} <= set(eval_results)
    assert eval_results["eval_samples"] == 48
    assert torch.isfinite(torch.tensor(eval_results["perplexity"]))
    assert eval_results["perplexity"] < perplexity_before

    losses = [e["loss"] for e in read_json(out / "trainer_state.json")["log_history"] if "loss" in e]
    assert losses[-1] < losses[0]

    # The checkpoint is a plain transformers BertForPreTraining checkpoint.
    model = AutoModelForPreTraining.from_pretrained(out)
    assert type(model).__name__ == "BertForPreTraining"
    assert read_json(out / "config.json")["max_num_masked_tokens"] == 16  # L=64, p=0.15


def test_resuming_after_an_interruption_gives_the_same_weights(assets, tmp_path, monkeypatch):
    args = ("--do_train", "--max_steps", "6", "--save_steps", "3", "--lr_scheduler_type", "linear")
    straight = tmp_path / "straight"
    run_script(monkeypatch, pretraining_argv(assets, straight, *args))

    interrupted = tmp_path / "interrupted"
    original_step = run_pretraining.IPUTrainer.training_step

    def crash_after_first_checkpoint(self, *a, **k):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("simulated crash")
        return original_step(self, *a, **k)

    monkeypatch.setattr(run_pretraining.IPUTrainer, "training_step", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_script(monkeypatch, pretraining_argv(assets, interrupted, *args))
    assert (interrupted / "checkpoint-3").is_dir() and not (interrupted / "model.safetensors").exists()
    monkeypatch.setattr(run_pretraining.IPUTrainer, "training_step", original_step)

    run_script(monkeypatch, pretraining_argv(assets, interrupted, *args))  # finds checkpoint-3 and resumes
    expected = load_file(straight / "model.safetensors")
    resumed = load_file(interrupted / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_whole_word_mask_trains(assets, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    _, batches = recorded_batches(monkeypatch, run_pretraining)
    out = tmp_path / "out"
    run_script(monkeypatch, pretraining_argv(assets, out, "--do_train", "--max_steps", "3", "--save_strategy", "no",
                                      "--whole_word_mask", "--logging_steps", "1"))
    labelled = assert_whole_words_masked(AutoTokenizer.from_pretrained(assets["tokenizer"]), batches)
    assert max(int(rows.sum(dim=1).max()) for rows in labelled) <= 16  # the cap at length 64
    losses = [e["loss"] for e in read_json(out / "trainer_state.json")["log_history"] if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


def test_data_seed_seeds_the_masking(assets, tmp_path, monkeypatch):
    made, _ = recorded_batches(monkeypatch, run_pretraining)
    run_script(monkeypatch, pretraining_argv(assets, tmp_path / "out", "--do_train", "--max_steps", "1",
                                             "--save_strategy", "no", "--data_seed", "11"))
    assert [collator.seed for collator in made] == [11]
    # One cap for the collator and the model: the one of the pairs' 64 tokens.
    assert made[0].max_num_masked_tokens == read_json(tmp_path / "out" / "config.json")["max_num_masked_tokens"] == 16


def test_whole_word_mask_with_data_masked_in_advance_is_refused(assets, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--whole_word_mask masks each batch afresh, --is_already_masked keeps"):
        run_script(monkeypatch, pretraining_argv(assets, tmp_path / "out", "--do_train", "--whole_word_mask",
                                          "--is_already_masked"))


def test_non_empty_output_dir_without_checkpoint_is_refused(assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty and holds no checkpoint to resume from.*--overwrite_output_dir"):
        run_script(monkeypatch, pretraining_argv(assets, out, "--do_train", "--max_steps", "1"))
    assert (out / "notes.txt").read_text() == "keep me"


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "run_pretraining.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


ORIGINAL_FLAGS = {
    "model": ["model_name_or_path", "model_type", "config_overrides", "config_name", "tokenizer_name", "cache_dir",
              "use_fast_tokenizer", "model_revision", "use_auth_token", "groupbert_schedule"],
    "data": ["dataset_name", "dataset_config_name", "dataset_path", "train_file", "validation_file", "data_dir",
             "overwrite_cache", "validation_split_percentage", "is_already_preprocessed", "is_already_masked",
             "max_seq_length", "preprocessing_num_workers", "mlm_probability", "line_by_line", "pad_to_max_length",
             "max_train_samples", "max_eval_samples"],
    "training": ["ipu_config_name", "ipu_config_overrides", "n_ipu", "fp32", "lamb", "lamb_no_bias_correction",
                 "loss_scaling", "auto_loss_scaling", "dataloader_mode", "compile_only", "pad_on_batch_axis",
                 "gradient_accumulation_steps", "gradient_checkpointing", "warmup_ratio"],
}


@pytest.mark.slow
def test_help_lists_every_flag_of_the_original():
    result = cli("--help")
    assert result.returncode == 0
    for flags in ORIGINAL_FLAGS.values():
        for flag in flags:
            assert f"--{flag}" in result.stdout, flag
    # The IPU flags come before the common training flags, and the rest of transformers' flags only with --help-all.
    assert result.stdout.index("--ipu_config_name") < result.stdout.index("--learning_rate")
    assert "--help-all lists every flag" in result.stdout and "--torch_compile_mode" not in result.stdout
    everything = cli("--help-all")
    assert everything.returncode == 0 and "--torch_compile_mode" in everything.stdout
    assert len(result.stdout.splitlines()) < len(everything.stdout.splitlines()) / 2


@pytest.mark.slow
def test_a_json_arguments_file_with_more_flags_is_refused(tmp_path):
    (tmp_path / "args.json").write_text('{"output_dir": "x", "dataset_name": "y"}')
    result = cli(str(tmp_path / "args.json"), "--do_train")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {tmp_path / 'args.json'} holds the arguments, and --do_train was given after it")


ORIGINAL_COMMANDS = [
    "--config_name bert-base-uncased --tokenizer_name bert-base-uncased --ipu_config_name . "
    "--dataset_name Graphcore/wikipedia-bert-128 --do_train --do_eval --output_dir /tmp/test-pretraining",
    "--config_name bert-base-uncased --tokenizer_name bert-base-uncased --ipu_config_name Graphcore/bert-base-ipu "
    "--dataset_name Graphcore/wikipedia-bert-128 --do_train --logging_steps 5 --max_seq_length 128 --max_steps 10500 "
    "--is_already_preprocessed --dataloader_num_workers 64 --dataloader_mode async_rebatched --lamb "
    "--lamb_no_bias_correction --per_device_train_batch_size 32 --gradient_accumulation_steps 512 --n_ipu 16 "
    "--learning_rate 0.006 --lr_scheduler_type linear --loss_scaling 16384 --weight_decay 0.01 --warmup_ratio 0.28 "
    "--output_dir /tmp/phase1",
    "--model_name_or_path /tmp/phase1 --config_name bert-base-uncased --tokenizer_name bert-base-uncased "
    "--ipu_config_name Graphcore/bert-base-ipu --dataset_name Graphcore/wikipedia-bert-512 --do_train "
    "--max_seq_length 512 --max_steps 2038 --per_device_train_batch_size 8 --learning_rate 0.002828 "
    "--loss_scaling 128.0 --warmup_ratio 0.128 --lamb --n_ipu 16 --output_dir /tmp/phase2",
    "--model_type groupbert --groupbert_schedule --tokenizer_name bert-base-uncased --ipu_config_name . "
    "--dataset_name Graphcore/wikipedia-bert-128 --do_train --output_dir /tmp/groupbert",
]


@pytest.mark.parametrize("command", ORIGINAL_COMMANDS)
def test_readme_commands_parse(command):
    parser = HfArgumentParser((run_pretraining.ModelArguments, run_pretraining.DataTrainingArguments,
                               IPUTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=command.split())
    assert data_args.dataset_name.startswith("Graphcore/")
    if "--n_ipu" in command:
        assert training_args.n_ipu == 16 and training_args.lamb


def test_readme_commands_with_quoted_overrides_parse():
    parser = HfArgumentParser((run_pretraining.ModelArguments, run_pretraining.DataTrainingArguments,
                               IPUTrainingArguments))
    args = ["--config_name", "bert-base-uncased", "--dataset_name", "Graphcore/wikipedia-bert-128",
            "--config_overrides", "layer_norm_eps=0.001", "--ipu_config_overrides",
            "device_iterations=1,matmul_proportion=[0.14 0.19 0.19 0.19]", "--gradient_accumulation_steps", "512",
            "--output_dir", "/tmp/x"]
    _, _, training_args = parser.parse_args_into_dataclasses(args=args)
    effective = effective_ipu_config(IPUConfig(layers_per_ipu=[0, 4, 4, 4], device_iterations=4), training_args)
    assert effective.gradient_accumulation_steps == 512 and effective.device_iterations == 1
    assert effective.matmul_proportion == [0.14, 0.19, 0.19, 0.19]


def test_groupbert_schedule_drives_the_learning_rate(assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(monkeypatch, pretraining_argv(assets, out, "--do_train", "--max_steps", "8", "--warmup_ratio", "0.25",
                                      "--groupbert_schedule", "--logging_steps", "1", "--learning_rate", "1e-3"))
    rates = [e["learning_rate"] for e in read_json(out / "trainer_state.json")["log_history"] if "learning_rate" in e]
    warmup, lr, lr_end = 2, 1e-3, 1e-7  # ceil(8 x 0.25)
    expected = [lr * (s / warmup) ** 0.5 if s < warmup else lr - (lr - lr_end) * (s - warmup) / (8 - warmup)
                for s in range(8)]
    assert rates == pytest.approx(expected, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("masking", ["dynamic", "static"])
def test_prepare_dataset_output_trains_with_dataset_path(assets, tmp_path, monkeypatch, masking):
    import prepare_dataset

    data = tmp_path / "data"
    prepare_dataset.main(["--tokenizer_name", assets["tokenizer"], "--train_file", assets["train_file"],
                          "--max_seq_length", "64", "--validation_split_percentage", "10", "--output_dir", str(data)]
                         + (["--static_masking"] if masking == "static" else []))
    argv = pretraining_argv(assets, tmp_path / "out", "--do_train", "--do_eval", "--max_steps", "3",
                            "--is_already_preprocessed", *(["--is_already_masked"] if masking == "static" else []))
    argv[argv.index("--train_file"):argv.index("--train_file") + 4] = ["--dataset_path", str(data)]
    run_script(monkeypatch, argv)
    results = read_json(tmp_path / "out" / "all_results.json")
    assert results["train_samples"] > 0 and math.isfinite(results["eval_loss"])


@pytest.mark.slow
def test_compile_only_compiles_into_the_executable_cache_and_stops(assets, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "exe_cache"
    argv = pretraining_argv(assets, tmp_path / "out", "--do_train", "--compile_only", "--max_train_samples", "16")
    overrides = argv.index("--ipu_config_overrides") + 1
    argv[overrides] += f",executable_cache_dir={cache}"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with caplog.at_level("INFO", logger="ipu_trainer"):
        run_script(monkeypatch, argv)
    assert any("--compile_only: model compiled" in r.getMessage() and str(cache) in r.getMessage() for r in caplog.records)
    assert cache.is_dir() and any(cache.iterdir())  # inductor wrote its kernels there
    assert not (tmp_path / "out" / "model.safetensors").exists()  # and nothing was trained


def test_a_text_dataset_without_pairs_is_turned_into_pairs(assets, tmp_path, monkeypatch):
    documents = open(assets["train_file"], encoding="utf-8").read().split("\n\n")
    DatasetDict({"train": Dataset.from_dict({"content": documents})}).save_to_disk(str(tmp_path / "text"))
    argv = pretraining_argv(assets, tmp_path / "out", "--do_train", "--do_eval", "--max_steps", "2")
    argv[argv.index("--train_file"):argv.index("--train_file") + 4] = ["--dataset_path", str(tmp_path / "text")]
    run_script(monkeypatch, argv)
    results = read_json(tmp_path / "out" / "all_results.json")
    assert results["train_samples"] > 0 and "eval_nsp_accuracy" in results
