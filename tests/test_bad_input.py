"""Bad input, as a new user (or a hostile tester) gives it: every row ends with exit code 2, one `error:` line
naming the flag or file, no traceback, and the user's files (a finished run's output folder with a note in it)
byte-identical afterwards. Rows whose input alone is enough to know also prove that no data or weights were
loaded first."""

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import REPO, quickstart_argv, script_module, snapshot_files
from datasets import Dataset, DatasetDict

from ipu_trainer.cli.startup import run_cli

SENTINEL = "notes.txt"
NOT_CACHED = "ipu-trainer-tests/not-cached"  # a hub id no cache holds


def prepare_argv(assets, output_dir, *extra):
    return ["prepare_dataset.py", "--tokenizer_name", assets["tokenizer"], "--train_file", assets["train_file"],
            "--max_seq_length", "64", "--output_dir", str(output_dir), "--cache_dir", str(output_dir.parent / "cache"),
            *extra]


# ---- files the rows use, made in the row's folder -----------------------------------------------------------


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def no_vocabulary_tokenizer(tmp, assets):
    write(tmp / "no-vocab" / "tokenizer_config.json", (open(os.path.join(assets["tokenizer"], "tokenizer_config.json")).read()))


def prebuilt_pairs(tmp, length, rows=4, columns=("input_ids", "attention_mask", "token_type_ids", "next_sentence_label")):
    data = {"input_ids": [[2, 5, 6, 3] + [0] * (length - 4)] * rows, "attention_mask": [[1] * 4 + [0] * (length - 4)] * rows,
            "token_type_ids": [[0] * length] * rows, "next_sentence_label": [0] * rows}
    DatasetDict({"train": Dataset.from_dict({c: data[c] for c in columns})}).save_to_disk(str(tmp / f"pairs{length}"))


def tfrecord_shard(tmp, features, name="other.tfrecord", records=1, cut=0):
    writer_module = pytest.importorskip("tfrecord.writer")
    path = tmp / name
    writer = writer_module.TFRecordWriter(str(path))
    for _ in range(records):
        writer.write({feature: ([1, 2, 3], "int") for feature in features})
    writer.close()
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])


BERT_FEATURES = ["input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids", "next_sentence_labels"]


def previous_prepare_output(tmp, extra=None):
    write(tmp / "prepared" / "prepare_dataset.json", "{}")
    write(tmp / "prepared" / "dataset_dict.json", json.dumps({"splits": ["train"]}))
    write(tmp / "prepared" / "train" / "state.json", "{}")
    if extra:
        write(tmp / "prepared" / extra, "the user's own file")


def unwritable_folder(tmp, _assets):
    """A folder this process cannot create files in: permissions for a normal user; root ignores them, so a
    sysfs folder (which refuses new files even to root) where the machine has one."""
    if os.geteuid() != 0:
        folder = tmp / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        return str(folder / "out")
    try:
        handle, probe = tempfile.mkstemp(dir="/sys/kernel")
    except OSError:
        return "/sys/kernel/out"
    os.close(handle)
    os.remove(probe)
    pytest.skip("running as root without a read-only sysfs: no folder refuses writes")


# ---- the table ----------------------------------------------------------------------------------------------
# script, {flag: value} changed in the quick-start command (None removes a flag, True adds a bare one),
# substrings the error line must hold, and the options:
#   make(tmp, assets): writes the files the row needs (and may return a value for "{made}")
#   early: True when the input alone suffices, so no data and no weights may be loaded before the refusal
#   hub: "offline" (HF_HUB_OFFLINE=1) or "unreachable" (an endpoint that refuses connections)
# Values may use {tmp} (the row's folder), {out} (the user's finished run), {tokenizer}, {bpe_tokenizer}, {made}.

MLM, CLM, PRETRAINING, PREPARE = "run_mlm", "run_clm", "run_pretraining", "prepare_dataset"

ROWS = {
    # -- names that point nowhere, and the hub ---------------------------------------------------------------
    "missing-model-folder": (MLM, {"--model_type": None, "--config_overrides": None,
                                   "--model_name_or_path": "{tmp}/no-such-model"},
                             ["--model_name_or_path", "no-such-model", "no such folder"], dict(early=True)),
    "missing-config-folder": (PRETRAINING, {"--model_type": None, "--config_overrides": None,
                                            "--config_name": "{tmp}/no-such-config"},
                              ["--config_name", "no-such-config", "no such folder"], dict(early=True)),
    "missing-tokenizer-folder": (CLM, {"--tokenizer_name": "{tmp}/no-such-tokenizer"},
                                 ["--tokenizer_name", "no-such-tokenizer", "no such folder"], dict(early=True)),
    "model-folder-without-config": (MLM, {"--model_type": None, "--config_overrides": None,
                                          "--model_name_or_path": "{tmp}/empty-folder"},
                                    ["--model_name_or_path", "empty-folder", "holds no config.json"],
                                    dict(early=True, make=lambda tmp, a: (tmp / "empty-folder").mkdir())),
    "empty-tokenizer-folder": (MLM, {"--tokenizer_name": "{tmp}/empty-folder"},
                               ["--tokenizer_name", "empty-folder", "holds no tokenizer.json"],
                               dict(early=True, make=lambda tmp, a: (tmp / "empty-folder").mkdir())),
    "hub-config-offline": (PRETRAINING, {"--model_type": None, "--config_overrides": None, "--config_name": NOT_CACHED,
                                         "--tokenizer_name": NOT_CACHED, "--cache_dir": "{tmp}/cache"},
                           ["--config_name " + NOT_CACHED, "HF_HUB_OFFLINE=1", "local folder", "hf download"],
                           dict(early=True, hub="offline")),
    "hub-tokenizer-offline": (MLM, {"--tokenizer_name": NOT_CACHED, "--cache_dir": "{tmp}/cache"},
                              ["--tokenizer_name " + NOT_CACHED, "HF_HUB_OFFLINE=1"], dict(early=True, hub="offline")),
    "hub-ipu-config-offline": (MLM, {"--ipu_config_name": NOT_CACHED},
                               ["--ipu_config_name " + NOT_CACHED, "HF_HUB_OFFLINE=1"], dict(early=True, hub="offline")),
    "hub-dataset-offline": (CLM, {"--train_file": None, "--validation_file": None, "--dataset_name": NOT_CACHED,
                                  "--cache_dir": "{tmp}/cache"},
                            ["--dataset_name " + NOT_CACHED, "HF_HUB_OFFLINE=1", "local folder of data files"],
                            dict(hub="offline")),
    "hub-config-unreachable": (MLM, {"--model_type": None, "--config_overrides": None, "--config_name": NOT_CACHED,
                                     "--cache_dir": "{tmp}/cache"},
                               ["--config_name " + NOT_CACHED, "could not be reached", "127.0.0.1:9", "HF_HUB_OFFLINE=1"],
                               dict(early=True, hub="unreachable")),
    "hub-dataset-unreachable": (MLM, {"--train_file": None, "--validation_file": None, "--dataset_name": NOT_CACHED},
                                ["--dataset_name " + NOT_CACHED, "could not be reached"], dict(hub="unreachable")),
    "push-to-hub-offline": (MLM, {"--push_to_hub": True}, ["--push_to_hub", "HF_HUB_OFFLINE=1"],
                            dict(early=True, hub="offline")),
    "push-to-hub-unreachable": (MLM, {"--push_to_hub": True}, ["--push_to_hub", "could not be reached"],
                                dict(early=True, hub="unreachable")),
    "report-to-missing-package": (MLM, {"--report_to": "tensorboard"}, ["--report_to tensorboard", "pip install tensorboard"],
                                  dict(early=True)),
    "report-to-unknown": (MLM, {"--report_to": "tensorbored"}, ["--report_to tensorbored", "not a known integration"],
                          dict(early=True)),
    "missing-ipu-config-folder": (MLM, {"--ipu_config_name": "{tmp}/no-such-ipu-config"},
                                  ["--ipu_config_name", "no-such-ipu-config"], dict(early=True)),
    "ipu-config-folder-without-file": (MLM, {"--ipu_config_name": "{tmp}/empty-folder"},
                                       ["--ipu_config_name", "empty-folder", "ipu_config.json"],
                                       dict(early=True, make=lambda tmp, a: (tmp / "empty-folder").mkdir())),
    "binary-ipu-config": (MLM, {"--ipu_config_name": "{tmp}/binary"}, ["--ipu_config_name", "binary", "not a text file"],
                          dict(early=True, make=lambda tmp, a: write(tmp / "binary" / "ipu_config.json",
                                                                     bytes(random.Random(0).randrange(256) for _ in range(300))))),
    # -- the model and its overrides ----------------------------------------------------------------------------
    "model-type-typo": (PRETRAINING, {"--model_type": "bert-base-uncased", "--config_overrides": None},
                        ["'bert-base-uncased' is not a model type", "--config_name bert-base-uncased"], dict(early=True)),
    "model-type-typo-clm": (CLM, {"--model_type": "gpt-2", "--config_overrides": None},
                            ["'gpt-2' is not a model type", "gpt2"], dict(early=True)),
    "config-override-two-equals": (MLM, {"--config_overrides": "a=b=c"}, ["--config_overrides", "'a=b=c'", "key=value"],
                                   dict(early=True)),
    "config-override-unknown-key": (MLM, {"--config_overrides": "hidden_sise=64"},
                                    ["--config_overrides", "'hidden_sise' is not a setting"], dict(early=True)),
    "config-override-bad-value": (MLM, {"--config_overrides": "hidden_size=big"}, ["--config_overrides", "hidden_size=big"],
                                  dict(early=True)),
    "ipu-override-two-equals": (MLM, {"--ipu_config_overrides": "a=b=c"}, ["--ipu_config_overrides", "'a=b=c'"],
                                dict(early=True)),
    "ipu-override-unknown-key": (PRETRAINING, {"--ipu_config_overrides": "foo=1"},
                                 ["--ipu_config_overrides", "unknown IPU config key 'foo'"], dict(early=True)),
    "ipu-override-bad-value": (PRETRAINING, {"--ipu_config_overrides": "replication_factor=-2"},
                               ["--ipu_config_overrides", "replication_factor=-2"], dict(early=True)),
    "ipu-override-wrong-layers": (PRETRAINING, {"--ipu_config_overrides": "layers_per_ipu=[1 2]"},
                                  ["--ipu_config_overrides", "layers_per_ipu"], dict(early=True)),
    "ipu-config-not-json": (MLM, {"--ipu_config_name": "{tmp}/ipu.json"}, ["--ipu_config_name", "ipu.json", "not valid JSON"],
                            dict(early=True, make=lambda tmp, a: write(tmp / "ipu.json", "replication_factor: 4\n"))),
    "ipu-config-bad-value": (MLM, {"--ipu_config_name": "{tmp}/ipu.json"}, ["--ipu_config_name", "replication_factor=0"],
                             dict(early=True, make=lambda tmp, a: write(tmp / "ipu.json", '{"replication_factor": 0}'))),
    "tokenizer-without-vocabulary": (MLM, {"--tokenizer_name": "{tmp}/no-vocab"},
                                     ["--tokenizer_name", "no-vocab", "no vocabulary"],
                                     dict(early=True, make=no_vocabulary_tokenizer)),
    # -- numeric flags ------------------------------------------------------------------------------------------
    "max-seq-length-zero": (MLM, {"--max_seq_length": "0"}, ["--max_seq_length=0"], dict(early=True)),
    "max-seq-length-too-short-for-pairs": (PRETRAINING, {"--max_seq_length": "3"}, ["--max_seq_length=3", ">= 5"],
                                           dict(early=True)),
    "block-size-zero": (CLM, {"--block_size": "0"}, ["--block_size=0"], dict(early=True)),
    "block-size-beyond-positions": (CLM, {"--block_size": "128"}, ["--block_size 128", "64 positions"], dict(early=True)),
    "epochs-nan": (MLM, {"--num_train_epochs": "nan"}, ["--num_train_epochs=nan"], dict(early=True)),
    "zero-epochs-no-max-steps": (MLM, {"--max_steps": None, "--num_train_epochs": "0"},
                                 ["--num_train_epochs 0", "--max_steps"], dict(early=True)),
    "eval-batch-zero": (MLM, {"--per_device_eval_batch_size": "0", "--do_eval": True},
                        ["--per_device_eval_batch_size=0"], dict(early=True)),
    "learning-rate-nan": (MLM, {"--learning_rate": "nan"}, ["--learning_rate=nan"], dict(early=True)),
    "max-train-samples-zero": (MLM, {"--max_train_samples": "0"}, ["--max_train_samples=0"], dict(early=True)),
    "validation-split-100": (MLM, {"--validation_file": None, "--validation_split_percentage": "100"},
                             ["--validation_split_percentage=100"], dict(early=True)),
    "max-sequences-per-row-zero": (PRETRAINING, {"--packing": True, "--max_sequences_per_row": "0"},
                                   ["--max_sequences_per_row=0"], dict(early=True)),
    "packing-without-line-by-line": (MLM, {"--packing": True}, ["--packing", "--line_by_line"], dict(early=True)),
    "packing-a-stream": (PRETRAINING, {"--packing": True, "--streaming": True}, ["--packing", "--streaming"],
                         dict(early=True)),
    "step-batch-larger-than-data": (MLM, {"--max_train_samples": "12"},
                                    ["12 samples", "--max_train_samples 12", "one step takes 16",
                                     "--per_device_train_batch_size"], dict()),
    # -- where the results go -----------------------------------------------------------------------------------
    "output-dir-is-a-file": (MLM, {"--output_dir": "{out}/" + SENTINEL}, ["--output_dir", SENTINEL, "is a file"],
                             dict(early=True)),
    "output-dir-under-a-file": (CLM, {"--output_dir": "{out}/" + SENTINEL + "/run"}, ["--output_dir", "is under the file"],
                                dict(early=True)),
    "output-dir-not-writable": (PRETRAINING, {"--output_dir": "{made}"}, ["--output_dir", "cannot write"],
                                dict(early=True, make=unwritable_folder)),
    # -- data files and datasets --------------------------------------------------------------------------------
    "missing-train-file": (MLM, {"--train_file": "{tmp}/no-such.txt"}, ["--train_file", "no-such.txt", "no such file"],
                           dict(early=True)),
    "unsupported-train-file": (MLM, {"--train_file": "{tmp}/train.parquet", "--validation_file": "{tmp}/train.parquet"},
                               ["--train_file", "unsupported file type '.parquet'"],
                               dict(early=True, make=lambda tmp, a: write(tmp / "train.parquet", b"PAR1"))),
    "markdown-train-file": (CLM, {"--train_file": "{tmp}/train.md"}, ["--train_file", "unsupported file type '.md'"],
                            dict(early=True, make=lambda tmp, a: write(tmp / "train.md", "# some text\n"))),
    "empty-train-file": (MLM, {"--train_file": "{tmp}/empty.txt"}, ["--train_file", "empty.txt", "is empty"],
                         dict(make=lambda tmp, a: write(tmp / "empty.txt", ""))),
    "blank-lines-train-file": (MLM, {"--train_file": "{tmp}/blank.txt"}, ["--train_file", "blank.txt", "blank lines"],
                               dict(make=lambda tmp, a: write(tmp / "blank.txt", "\n   \n\n" * 500))),
    "blank-lines-train-file-clm": (CLM, {"--train_file": "{tmp}/blank.txt"}, ["--train_file", "blank.txt", "blank lines"],
                                   dict(make=lambda tmp, a: write(tmp / "blank.txt", "\n\n\n" * 500))),
    "blank-lines-line-by-line": (MLM, {"--train_file": "{tmp}/blank.txt", "--line_by_line": True},
                                 ["--train_file", "blank.txt", "blank lines"],
                                 dict(make=lambda tmp, a: write(tmp / "blank.txt", "\n   \n\n"))),
    "text-shorter-than-a-block": (CLM, {"--train_file": "{tmp}/short.txt"}, ["--train_file", "short.txt", "shorter than one block of 64 tokens"],
                                  dict(make=lambda tmp, a: write(tmp / "short.txt", "Too short for a block.\n"))),
    "json-without-text-column": (MLM, {"--train_file": "{tmp}/numbers.json", "--validation_file": "{tmp}/numbers.json"},
                                 ["--train_file", "numbers.json", "no 'text' column", "'a'"],
                                 dict(make=lambda tmp, a: write(tmp / "numbers.json", '{"a": 1, "b": 2}\n' * 40))),
    "csv-without-text-column": (CLM, {"--train_file": "{tmp}/numbers.csv", "--validation_file": "{tmp}/numbers.csv"},
                                ["--train_file", "numbers.csv", "no 'text' column"],
                                dict(make=lambda tmp, a: write(tmp / "numbers.csv", "a,b\n" + "1,2\n" * 40))),
    "header-only-csv": (MLM, {"--train_file": "{tmp}/header.csv", "--validation_file": "{tmp}/header.csv"},
                        ["--train_file", "header.csv", "a header", "no rows"],
                        dict(make=lambda tmp, a: write(tmp / "header.csv", "text\n"))),
    "header-only-csv-pretraining": (PRETRAINING, {"--train_file": "{tmp}/header.csv", "--validation_file": None},
                                    ["header.csv", "a header", "no rows"],
                                    dict(make=lambda tmp, a: write(tmp / "header.csv", "text\n"))),
    "missing-dataset-path": (PRETRAINING, {"--train_file": None, "--validation_file": None,
                                           "--dataset_path": "{tmp}/no-such-data", "--is_already_preprocessed": True},
                             ["--dataset_path", "no-such-data"], dict(early=True)),
    "dataset-path-with-validation-file": (PRETRAINING, {"--train_file": None, "--dataset_path": "{tmp}/pairs64",
                                                        "--is_already_preprocessed": True},
                                          ["--validation_file would be ignored with --dataset_path", "prepare_dataset.py"],
                                          dict(early=True, make=lambda tmp, a: prebuilt_pairs(tmp, 64))),
    "prebuilt-longer-than-positions": (PRETRAINING, {"--train_file": None, "--validation_file": None,
                                                     "--max_seq_length": None, "--dataset_path": "{tmp}/pairs128",
                                                     "--is_already_preprocessed": True},
                                       ["--dataset_path", "pairs128", "128-token", "64 positions"],
                                       dict(make=lambda tmp, a: prebuilt_pairs(tmp, 128))),
    "prebuilt-without-nsp-labels": (PRETRAINING, {"--train_file": None, "--validation_file": None,
                                                  "--dataset_path": "{tmp}/pairs64", "--is_already_preprocessed": True},
                                    ["--dataset_path", "pairs64", "no 'next_sentence_label' column", "prepare_dataset.py"],
                                    dict(make=lambda tmp, a: prebuilt_pairs(tmp, 64, columns=("input_ids", "attention_mask",
                                                                                              "token_type_ids")))),
    # -- --streaming --------------------------------------------------------------------------------------------
    "streaming-without-max-steps": (CLM, {"--streaming": True, "--max_steps": None},
                                    ["--streaming with --do_train needs --max_steps"], dict(early=True)),
    "streaming-eval-without-validation-file": (MLM, {"--streaming": True, "--do_eval": True, "--validation_file": None,
                                                     "--max_eval_samples": None},
                                               ["--streaming with --do_eval and no validation data", "--max_eval_samples N"],
                                               dict(early=True)),
    "streaming-eval-without-validation-split": (PRETRAINING, {"--train_file": None, "--validation_file": None,
                                                              "--dataset_path": "{tmp}/pairs64",
                                                              "--is_already_preprocessed": True, "--streaming": True,
                                                              "--do_eval": True, "--max_eval_samples": None},
                                                ["--streaming with --do_eval and no validation data", "--max_eval_samples N"],
                                                dict(make=lambda tmp, a: prebuilt_pairs(tmp, 64))),
    "streaming-held-out-pairs-take-every-document": (PRETRAINING, {"--streaming": True, "--do_eval": True,
                                                                   "--validation_file": None},
                                                     ["--max_eval_samples 16", "holds out all", "--train_file",
                                                      "nothing is left to train on"], dict()),
    # -- prepare_dataset.py -------------------------------------------------------------------------------------
    "prepare-missing-file": (PREPARE, {"--train_file": "{tmp}/missing.txt"}, ["missing.txt does not exist"], dict()),
    "prepare-empty-file": (PREPARE, {"--train_file": "{tmp}/empty.txt"}, ["empty.txt is empty"],
                           dict(make=lambda tmp, a: write(tmp / "empty.txt", ""))),
    "prepare-one-sentence": (PREPARE, {"--train_file": "{tmp}/one.txt"}, ["No sentence pairs could be built", "--train_file", "one.txt"],
                             dict(make=lambda tmp, a: write(tmp / "one.txt", "One lonely sentence."))),
    "prepare-unsupported-extension": (PREPARE, {"--train_file": "{tmp}/corpus.xml"}, ["corpus.xml", "unsupported extension 'xml'"],
                                      dict(make=lambda tmp, a: write(tmp / "corpus.xml", "<doc>text</doc>"))),
    "prepare-tokenizer-without-vocabulary": (PREPARE, {"--tokenizer_name": "{tmp}/no-vocab"},
                                             ["--tokenizer_name", "no vocabulary"], dict(make=no_vocabulary_tokenizer)),
    "prepare-missing-tokenizer": (PREPARE, {"--tokenizer_name": "{tmp}/no-such-tokenizer"},
                                  ["--tokenizer_name", "no such folder"], dict()),
    "prepare-garbage-tfrecord": (PREPARE, {"--train_file": None, "--tokenizer_name": None, "--max_seq_length": None,
                                           "--tfrecord_files": "{tmp}/garbage.tfrecord"},
                                 ["--tfrecord_files", "garbage.tfrecord", "not a TFRecord file"],
                                 dict(make=lambda tmp, a: write(tmp / "garbage.tfrecord",
                                                                bytes(random.Random(1).randrange(256) for _ in range(300))))),
    "prepare-foreign-tfrecord": (PREPARE, {"--train_file": None, "--tokenizer_name": None, "--max_seq_length": None,
                                           "--tfrecord_files": "{tmp}/other.tfrecord"},
                                 ["--tfrecord_files", "other.tfrecord", "not a BERT pretraining shard", "segment_ids"],
                                 dict(make=lambda tmp, a: tfrecord_shard(tmp, ["input_ids", "label"]))),
    "prepare-truncated-tfrecord": (PREPARE, {"--train_file": None, "--tokenizer_name": None, "--max_seq_length": None,
                                             "--tfrecord_files": "{tmp}/cut.tfrecord"},
                                   ["--tfrecord_files", "cut.tfrecord", "truncated", "byte"],
                                   dict(make=lambda tmp, a: tfrecord_shard(tmp, BERT_FEATURES, "cut.tfrecord", 3, cut=7))),
    "prepare-validation-file-and-percentage": (PREPARE, {"--validation_file": "{tmp}/v.txt",
                                                         "--validation_split_percentage": "10"},
                                               ["--validation_file or --validation_split_percentage, not both"],
                                               dict(make=lambda tmp, a: write(tmp / "v.txt", "One. Two.\n\nThree."))),
    "prepare-user-partial-folder": (PREPARE, {"--output_dir": "{tmp}/data"}, ["data.partial", "not left by prepare_dataset.py"],
                                    dict(make=lambda tmp, a: write(tmp / "data.partial" / SENTINEL, "mine"))),
    "prepare-overwrite-current-folder": (PREPARE, {"--output_dir": ".", "--overwrite": True},
                                         ["--overwrite", "not a prepare_dataset.py output"], dict()),
    "prepare-overwrite-a-model": (PREPARE, {"--output_dir": "{out}", "--overwrite": True},
                                  ["--overwrite", "not a prepare_dataset.py output"], dict()),
    "prepare-overwrite-output-with-user-files": (PREPARE, {"--output_dir": "{tmp}/prepared", "--overwrite": True},
                                                 ["--overwrite", "did not write", SENTINEL],
                                                 dict(make=lambda tmp, a: previous_prepare_output(tmp, SENTINEL))),
    "prepare-output-not-empty": (PREPARE, {"--output_dir": "{out}"}, ["--output_dir", "not empty", "--overwrite"], dict()),
    "prepare-shard-size-not-a-size": (PREPARE, {"--max_shard_size": "lots"}, ["--max_shard_size='lots'", "500MB"], dict()),
    "prepare-no-shards": (PREPARE, {"--num_shards": "0"}, ["--num_shards=0 must be >= 1"], dict()),
}

# What a row that is refused "early" must not have reached.
LOADERS = {MLM: ("load_raw_datasets", "load_model"), CLM: ("load_raw_datasets", "load_model"),
           PRETRAINING: ("load_raw_datasets", "load_model"), PREPARE: ("load_text_documents", "build_nsp_pairs")}


def edit(argv, changes):
    argv = list(argv)
    for flag, value in changes.items():
        if flag in argv:
            index = argv.index(flag)
            takes_value = index + 1 < len(argv) and not argv[index + 1].startswith("--")
            del argv[index:index + (2 if takes_value else 1)]
        if value is True:
            argv.append(flag)
        elif value is not None:
            argv += [flag, value]
    return argv


@pytest.mark.parametrize("row", list(ROWS), ids=list(ROWS))
def test_bad_input_is_one_error_line_and_touches_nothing(row, request, assets, trained_output, tmp_path, monkeypatch, capsys):
    script, changes, expected, options = ROWS[row]
    if options.get("hub"):
        request.getfixturevalue(options["hub"])
    if row == "report-to-missing-package":
        # Stand in for a machine without tensorboard where it is installed.
        from ipu_trainer.run import training_args

        available = [name for name in training_args.get_available_reporting_integrations() if name != "tensorboard"]
        monkeypatch.setattr(training_args, "get_available_reporting_integrations", lambda: available)

    # The user's files: a finished run's output folder with a note in it, and the row's own files.
    out = tmp_path / "out"
    shutil.copytree(trained_output, out)
    (out / SENTINEL).write_text("the user's notes")
    made = options["make"](tmp_path, assets) if "make" in options else None
    monkeypatch.chdir(out)  # so that "." is the user's folder
    values = {"tmp": tmp_path, "out": out, "made": made, **assets}
    argv = prepare_argv(assets, tmp_path / "data") if script == PREPARE else quickstart_argv(script, assets, out)
    argv = edit(argv, {flag: value.format(**values) if isinstance(value, str) else value for flag, value in changes.items()})
    before = snapshot_files(tmp_path, skip=("cache",))

    module = script_module(script)
    if options.get("early"):
        def must_not_run(*args, **kwargs):
            raise AssertionError("data or weights were loaded before the input was refused")

        for name in LOADERS[script]:
            monkeypatch.setattr(module, name, must_not_run)
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    start = time.perf_counter()
    code = module.cli() if script == PREPARE else run_cli(module.main)
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err

    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for piece in expected:
        assert piece in lines[0], lines[0]
    assert snapshot_files(tmp_path, skip=("cache",)) == before
    if options.get("hub"):
        assert seconds < 5, f"{seconds:.1f} s: the hub was retried"


def test_a_missing_local_folder_does_not_blame_the_network(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", edit(quickstart_argv(MLM, assets, tmp_path / "out"),
                                          {"--model_type": None, "--config_overrides": None,
                                           "--model_name_or_path": str(tmp_path / "models" / "bert")}))
    assert run_cli(script_module(MLM).main) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no such folder" in line and not any(word in line.lower() for word in ("network", "connect", "internet", "hub ("))


@pytest.mark.slow
def test_an_unreachable_hub_fails_at_once_without_offline_mode(tmp_path):
    """The seed README's command with nothing cached and a hub that refuses connections: one line, in seconds,
    instead of five retries with back-off and a traceback. A real process, so the libraries read HF_ENDPOINT."""
    environment = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home"),
                   "PYTHONPATH": REPO}
    environment.pop("HF_HUB_OFFLINE", None)
    command = [sys.executable, os.path.join(REPO, "run_pretraining.py"), "--config_name", "bert-base-uncased",
               "--tokenizer_name", "bert-base-uncased", "--ipu_config_name", ".", "--dataset_name",
               "Graphcore/wikipedia-bert-128", "--do_train", "--do_eval", "--output_dir", str(tmp_path / "out")]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=120)
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "--config_name bert-base-uncased" in line and "could not be reached" in line
    assert seconds < 20  # the interpreter and its imports; the retries alone took ~25 s


def test_config_overrides_of_settings_that_default_to_none_take_the_type_of_the_text():
    from transformers import BertConfig, GPT2Config

    from ipu_trainer.cli.model_loading import apply_config_overrides

    gpt2 = GPT2Config()
    assert gpt2.pad_token_id is None
    apply_config_overrides(gpt2, "pad_token_id=0,n_layer=3")
    assert gpt2.pad_token_id == 0 and gpt2.n_layer == 3
    bert = BertConfig()
    apply_config_overrides(bert, "classifier_dropout=0.25,layer_norm_eps=0.001,hidden_act=gelu_new")
    assert (bert.classifier_dropout, bert.layer_norm_eps, bert.hidden_act) == (0.25, 0.001, "gelu_new")


@pytest.mark.parametrize("loader", ["run_mlm/run_clm", "run_pretraining"])
@pytest.mark.parametrize("suffix, content", [
    ("txt", "Caf\xe9 au lait. Tr\xe8s bien.\n"),
    ("csv", "text\nCaf\xe9 au lait. Tr\xe8s bien.\n"),
    ("json", '{"text": "Caf\xe9 au lait. Tr\xe8s bien."}\n'),
])
def test_text_that_is_not_utf8_is_read_with_replacement_characters_and_a_warning(tmp_path, caplog, suffix, content, loader):
    """All scripts read bytes that are not UTF-8 alike: as U+FFFD, with a warning naming the file (see
    data.check_text_file for why not an error)."""
    from types import SimpleNamespace

    from ipu_trainer.cli.datasets import load_raw_datasets
    from ipu_trainer.data.nsp_pairs import load_text_documents

    path = tmp_path / f"latin1.{suffix}"
    path.write_bytes(content.encode("latin-1"))
    data_args = SimpleNamespace(dataset_name=None, train_file=str(path), validation_file=None,
                                validation_split_percentage=0)
    with caplog.at_level("WARNING", logger="ipu_trainer"):
        raw = load_raw_datasets(data_args, SimpleNamespace(cache_dir=str(tmp_path / "cache")),
                                file_loader=load_text_documents if loader == "run_pretraining" else None)
    assert raw["train"]["text"] == ["Caf\ufffd au lait. Tr\ufffds bien."]
    assert any(f"{path} is not valid UTF-8" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("environment, prints", [
    ({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "1", "LOCAL_RANK": "1"}, False),
    ({"RANK": "3"}, False), ({"RANK": "4", "LOCAL_RANK": "0"}, True),
])
def test_under_torchrun_the_first_process_of_each_machine_prints_the_error(monkeypatch, capsys, environment, prints):
    """Every process refuses the input (exit code 2); the environment torchrun sets decides who prints, as most
    input is refused before the process group exists. tests/test_distributed.py runs it under torchrun."""
    for name in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    def refused():
        raise ValueError("--max_seq_length=0 is invalid:\nmust be >= 1")

    assert run_cli(refused) == 2
    err = capsys.readouterr().err
    assert err == ("error: --max_seq_length=0 is invalid: must be >= 1\n" if prints else "")
