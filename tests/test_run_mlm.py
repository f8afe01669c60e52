"""run_mlm.py end to end on CPU: tiny masked LMs from a config, text and tokenizer made on the machine,
the original flags and the repository's ipu_config.json."""

import dataclasses
import math
import os
import sys

import pytest
import torch
from datasets import load_dataset
from matplotlib.image import imread
from transformers import AutoModelForMaskedLM, AutoTokenizer

from conftest import assert_whole_words_masked, read_json, recorded_batches, run_script, script_module
from ipu_trainer import IPUConfig, IPUTrainingArguments
from ipu_trainer.cli.script_args import parse_script_args
from ipu_trainer.data.collators import DataCollatorForLanguageModelingWithMaxTokensMasked
from ipu_trainer.run.resolved_run import effective_ipu_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import run_mlm  # noqa: E402

SEQ = 64
TINY_BERT = (
    "vocab_size=2000,hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128,"
    f"max_position_embeddings={SEQ}"
)
ONE_CPU = "layers_per_ipu=[-1],ipus_per_replica=1,replication_factor=1,gradient_accumulation_steps=2"
SEED = 7




def mlm_argv(assets, output_dir, *extra, model=("--model_type", "bert", "--config_overrides", TINY_BERT)):
    return [
        "run_mlm.py", *model, "--tokenizer_name", assets["tokenizer"], "--train_file", assets["train_file"],
        "--validation_file", assets["validation_file"], "--max_seq_length", str(SEQ),
        "--ipu_config_name", REPO, "--ipu_config_overrides", ONE_CPU,
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_train_samples", "400",
        "--max_eval_samples", "48", "--learning_rate", "5e-3", "--output_dir", str(output_dir), "--report_to", "none",
        "--disable_tqdm", "true", "--seed", str(SEED), "--fp32", *extra,
    ]


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """One short training run (and an evaluation of the same initial weights before it)."""
    monkeypatch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("mlm")
    try:
        run_script(monkeypatch, mlm_argv(assets, root / "before", "--do_eval"))
        run_script(monkeypatch, mlm_argv(assets, root / "out", "--do_train", "--do_eval", "--max_steps", "30",
                                  "--save_steps", "15", "--logging_steps", "5"))
    finally:
        monkeypatch.undo()
    return root


def test_tiny_bert_trains_and_writes_results(trained):
    out = trained / "out"
    for name in ("train_results.json", "eval_results.json", "all_results.json", "trainer_state.json", "README.md",
                 "ipu_config.json", "config.json", "model.safetensors", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-15" / "ipu_config.json").is_file() and (out / "checkpoint-30").is_dir()
    # The curves, drawn after the final evaluation: loss, accuracy, learning rate, samples/s and tokens/s panels,
    # two wide. trainer_state.json was saved again after it, so `python -m ipu_trainer.plot` draws it too.
    assert imread(out / "training_curves.png").shape[:2] == (3 * 360, 2 * 640)
    final_evaluation = read_json(out / "trainer_state.json")["log_history"][-1]
    assert final_evaluation["eval_loss"] == read_json(out / "eval_results.json")["eval_loss"]
    card = (out / "README.md").read_text()
    assert "This model was trained from scratch on the train.txt dataset." in card and "None" not in card

    results = read_json(out / "eval_results.json")
    assert {"eval_loss", "perplexity", "eval_samples", "eval_accuracy"} <= set(results)
    assert results["eval_samples"] == 48
    assert results["perplexity"] == pytest.approx(torch.tensor(results["eval_loss"]).exp().item(), rel=1e-5)
    before = read_json(trained / "before" / "eval_results.json")
    assert results["perplexity"] < 0.5 * before["perplexity"]
    assert results["eval_accuracy"] > before["eval_accuracy"]
    assert {"train_loss", "train_samples"} <= set(read_json(out / "all_results.json"))

    config = read_json(out / "config.json")
    assert config["architectures"] == ["BertForMaskedLM"]  # a plain checkpoint, not our subclass
    assert config["max_num_masked_tokens"] == 16  # L=64, p=0.15
    # The IPU config the run used, overrides applied, travels with the model.
    ipu_config = read_json(out / "ipu_config.json")
    assert ipu_config["layers_per_ipu"] == [-1] and ipu_config["gradient_accumulation_steps"] == 2
    # One step = micro 8 x accumulation 2 samples.
    assert read_json(out / "trainer_state.json")["global_step"] == 30


def test_checkpoint_reloads_with_auto_class_and_reproduces_eval_loss(trained, assets, monkeypatch):
    out, again = trained / "out", trained / "again"
    # Evaluate the saved checkpoint through the script (it picks up out/ipu_config.json by itself)...
    monkeypatch.setattr(sys, "argv", [
        "run_mlm.py", "--model_name_or_path", str(out), "--validation_file", assets["validation_file"],
        "--max_seq_length", str(SEQ), "--per_device_eval_batch_size", "16", "--max_eval_samples", "48",
        "--do_eval", "--output_dir", str(again), "--report_to", "none", "--seed", str(SEED), "--fp32",
        "--disable_tqdm", "true",
    ])
    run_mlm.main()
    script_loss = read_json(again / "eval_results.json")["eval_loss"]

    # ...and by hand with the plain upstream class, masking with the same seeded collator.
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(model).__name__ == "BertForMaskedLM"
    tokenizer = AutoTokenizer.from_pretrained(out)
    raw = load_dataset("text", data_files={"validation": assets["validation_file"]})
    data = script_module("run_mlm").tokenize_for_masked_lm(raw, tokenizer, SEQ, line_by_line=False, pad_to_max_length=False)["validation"]
    data = data.select(range(48)).remove_columns("special_tokens_mask")
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, mlm_probability=0.15, max_seq_length=SEQ, seed=SEED)
    losses = []
    with torch.no_grad():
        for start in range(0, 48, 16):
            losses.append(model(**collator([data[i] for i in range(start, start + 16)])).loss.item())
    assert script_loss == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    # Masks are seeded by batch content, so the training run's own evaluation saw the same batches.
    assert read_json(out / "eval_results.json")["eval_loss"] == pytest.approx(script_loss, rel=1e-4)


@pytest.mark.parametrize("model, extra", [
    pytest.param(
        ("--model_type", "roberta", "--config_overrides",
         f"vocab_size=2000,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,max_position_embeddings={SEQ + 2}"),
        ("--line_by_line", "--pad_to_max_length"), id="roberta-line-by-line",
    ),
    pytest.param(
        ("--model_type", "distilbert", "--config_overrides",
         f"vocab_size=2000,dim=32,n_layers=2,n_heads=2,hidden_dim=64,max_position_embeddings={SEQ}"),
        ("--line_by_line",), id="distilbert",
    ),
])
def test_other_architectures_train(assets, tmp_path, monkeypatch, model, extra):
    run_script(monkeypatch, mlm_argv(assets, tmp_path, "--do_train", "--do_eval", "--max_steps", "2", "--max_eval_samples", "16",
                              "--save_strategy", "no", *extra, model=model))
    results = read_json(tmp_path / "eval_results.json")
    assert results["eval_samples"] == 16 and 0.0 <= results["eval_accuracy"] <= 1.0
    architecture = {"roberta": "RobertaForMaskedLM", "distilbert": "DistilBertForMaskedLM"}[model[1]]
    assert read_json(tmp_path / "config.json")["architectures"] == [architecture]
    assert type(AutoModelForMaskedLM.from_pretrained(tmp_path)).__name__ == architecture


def test_whole_word_mask_trains(assets, tmp_path, monkeypatch):
    made, batches = recorded_batches(monkeypatch, run_mlm)
    run_script(monkeypatch, mlm_argv(assets, tmp_path, "--do_train", "--max_steps", "3", "--save_strategy", "no",
                              "--line_by_line", "--whole_word_mask", "--logging_steps", "1"))
    assert [collator.whole_word_mask for collator in made] == [True] and made[0].word_boundaries is not None
    # One cap for the collator and the model: the one of --max_seq_length 64.
    assert made[0].max_num_masked_tokens == read_json(tmp_path / "config.json")["max_num_masked_tokens"] == 16
    assert_whole_words_masked(AutoTokenizer.from_pretrained(assets["tokenizer"]), batches)
    losses = [e["loss"] for e in read_json(tmp_path / "trainer_state.json")["log_history"] if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


def test_line_by_line_batches_are_padded_to_the_half_precision_multiple(assets, tmp_path, monkeypatch):
    made, batches = recorded_batches(monkeypatch, run_mlm)
    asked = []

    def on_a_gpu_in_half_precision(run, max_length=None):  # the decision itself: tests/test_collators.py
        asked.append((run.precision.mixed_precision, max_length))
        return 8

    monkeypatch.setattr(run_mlm, "pad_to_multiple_of_for", on_a_gpu_in_half_precision)
    run_script(monkeypatch, mlm_argv(assets, tmp_path, "--do_train", "--max_steps", "3", "--save_strategy", "no",
                              "--line_by_line", "--max_seq_length", "60", "--per_device_train_batch_size", "1"))
    assert asked == [("no", 60)] and made[0].pad_to_multiple_of == 8
    lengths = {batch["input_ids"].shape[1] for batch in batches}
    assert all(length % 8 == 0 for length in lengths) and len(lengths) > 1  # dynamic, and rounded up


# ---- command line ----------------------------------------------------------------------------------------

ORIGINAL_MODEL_FLAGS = ["model_name_or_path", "model_type", "config_overrides", "config_name", "tokenizer_name", "cache_dir",
                    "use_fast_tokenizer", "model_revision", "use_auth_token", "low_cpu_mem_usage"]
ORIGINAL_DATA_FLAGS = ["dataset_name", "dataset_config_name", "train_file", "validation_file", "overwrite_cache",
                   "validation_split_percentage", "max_seq_length", "preprocessing_num_workers", "mlm_probability",
                   "line_by_line", "pad_to_max_length", "max_train_samples", "max_eval_samples"]
ORIGINAL_IPU_FLAGS = ["ipu_config_name", "ipu_config_overrides", "n_ipu", "fp32", "lamb", "lamb_no_bias_correction",
                  "loss_scaling", "auto_loss_scaling", "dataloader_mode", "compile_only", "pad_on_batch_axis",
                  "gradient_accumulation_steps", "gradient_checkpointing"]


def test_help_lists_every_flag(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["run_mlm.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        run_mlm.main()
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ORIGINAL_MODEL_FLAGS + ORIGINAL_DATA_FLAGS + ORIGINAL_IPU_FLAGS:
        assert f"--{flag} " in help_text or f"--{flag}\n" in help_text, flag


def test_defaults_match_the_original():
    model_defaults = {f.name: f.default for f in dataclasses.fields(run_mlm.ModelArguments)}
    assert model_defaults == {
        "model_name_or_path": None, "model_type": None, "config_overrides": None, "config_name": None,
        "tokenizer_name": None, "cache_dir": None, "use_fast_tokenizer": True, "model_revision": "main",
        "use_auth_token": False, "low_cpu_mem_usage": False,
        # the transformers examples' flags, beyond the original's
        "token": None, "trust_remote_code": False, "torch_dtype": None, "dtype": None,
    }
    data_defaults = {f.name: f.default for f in dataclasses.fields(run_mlm.DataTrainingArguments)}
    assert data_defaults == {
        "dataset_name": None, "dataset_config_name": None, "train_file": None, "validation_file": None,
        "overwrite_cache": False, "validation_split_percentage": 5, "max_seq_length": None,
        "preprocessing_num_workers": None, "mlm_probability": 0.15, "line_by_line": False,
        "pad_to_max_length": False, "max_train_samples": None, "max_eval_samples": None, "whole_word_mask": False,
        "streaming": False,  # the transformers examples' flag, beyond the original's
        "packing": False, "max_sequences_per_row": None,  # this project's opt-in --packing
    }


def test_readme_command_parses(monkeypatch):
    command = (
        "run_mlm.py --model_name_or_path roberta-base --ipu_config_name Graphcore/roberta-base-ipu "
        "--dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --per_device_train_batch_size 4 "
        "--per_device_eval_batch_size 1 --gradient_accumulation_steps 16 --do_train --do_eval "
        "--num_train_epochs 5 --n_ipu 16 --output_dir /tmp/mlm_output "
        "--ipu_config_overrides=inference_device_iterations=5 --dataloader_drop_last"
    )
    monkeypatch.setattr(sys, "argv", command.split())
    model_args, data_args, training_args = parse_script_args(run_mlm.ModelArguments, run_mlm.DataTrainingArguments)
    assert isinstance(training_args, IPUTrainingArguments)
    assert model_args.model_name_or_path == "roberta-base" and data_args.dataset_config_name == "wikitext-2-raw-v1"
    assert training_args.n_ipu == 16 and training_args.dataloader_drop_last
    effective = effective_ipu_config(IPUConfig(layers_per_ipu=[-1, -1, -1, -1]), training_args)
    assert (effective.replication_factor, effective.gradient_accumulation_steps) == (4, 16)
    assert effective.inference_device_iterations == 5


def test_encoder_only_checkpoint_gets_a_fresh_mlm_head_and_says_so(assets, tmp_path, monkeypatch, caplog):
    # Like fine-tuning a sentence-embedding BERT (e.g. all-MiniLM-L6-v2): encoder weights, no MLM head.
    from transformers import BertConfig, BertModel

    encoder_dir = tmp_path / "encoder"
    BertModel(BertConfig(vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=SEQ)).save_pretrained(encoder_dir)
    AutoTokenizer.from_pretrained(assets["tokenizer"]).save_pretrained(encoder_dir)
    with caplog.at_level("WARNING", logger="ipu_trainer"):
        run_script(monkeypatch, mlm_argv(assets, tmp_path / "out", "--do_train", "--max_steps", "1", "--save_strategy", "no",
                                  model=("--model_name_or_path", str(encoder_dir))))
    warning = next(r.getMessage() for r in caplog.records if "freshly initialised" in r.getMessage())
    assert "cls.predictions.transform.dense.weight" in warning and "bert.encoder" not in warning
    assert read_json(tmp_path / "out" / "config.json")["architectures"] == ["BertForMaskedLM"]


def test_without_validation_data_the_first_percent_of_train_is_held_out(tmp_path):
    """As the original and the transformers examples: validation = train[:N%], train = train[N%:]."""
    from datasets import load_dataset

    from ipu_trainer.cli.datasets import load_raw_datasets

    lines = [f"line {i}" for i in range(40)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    data_args = dataclasses.replace(run_mlm.DataTrainingArguments(train_file=str(tmp_path / "train.txt")),
                                    validation_split_percentage=5)
    raw = load_raw_datasets(data_args, run_mlm.ModelArguments())
    expected_validation = load_dataset("text", data_files={"train": str(tmp_path / "train.txt")}, split="train[:5%]")
    expected_train = load_dataset("text", data_files={"train": str(tmp_path / "train.txt")}, split="train[5%:]")
    assert raw["validation"]["text"] == expected_validation["text"] == ["line 0", "line 1"]
    assert raw["train"]["text"] == expected_train["text"]
