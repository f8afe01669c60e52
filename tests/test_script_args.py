"""cli.script_args: the flags the three scripts share, parsed and checked before anything is loaded; the command line
as a new user meets it (`--help` opens with what the script does and an example and lists every flag README's quick
starts use; a value argparse refuses is one `error:` line naming the flag)."""

import json
import re
from types import SimpleNamespace

import pytest
from conftest import REPO, bash_blocks, script_module

from ipu_trainer.cli.script_args import DataArguments, PackingArguments, check_streaming_args, parse_script_args
from ipu_trainer.cli.startup import run_cli


@pytest.mark.parametrize("script", ["run_pretraining", "run_mlm", "run_clm"])
def test_token_trust_remote_code_and_dtype_flags_parse_in_every_script(script, monkeypatch):
    module = script_module(script)
    monkeypatch.setattr("sys.argv", [f"{script}.py", "--token", "hf_secret", "--trust_remote_code", "--dtype",
                                     "bfloat16", "--dataset_name", "x", "--output_dir", "o"])
    model_args, _, _ = parse_script_args(module.ModelArguments, module.DataTrainingArguments)
    assert (model_args.token, model_args.trust_remote_code, model_args.dtype) == ("hf_secret", True, "bfloat16")
    monkeypatch.setattr("sys.argv", [f"{script}.py", "--torch_dtype", "float16", "--dtype", "bfloat16",
                                     "--dataset_name", "x", "--output_dir", "o"])
    with pytest.raises(ValueError, match="--torch_dtype float16 and --dtype bfloat16 disagree"):
        parse_script_args(module.ModelArguments, module.DataTrainingArguments)


# ---- --streaming: what it needs from the other flags, before anything is loaded ---------------------------------


def streaming_data_args(**values):
    flags = dict(streaming=True, train_file="train.txt", validation_file=None, max_eval_samples=None)
    return SimpleNamespace(**{**flags, **values})


def test_streaming_needs_max_steps_to_train_and_a_hold_out_size_to_evaluate_local_files_without_validation():
    training = SimpleNamespace(do_train=True, do_eval=False, max_steps=-1)
    with pytest.raises(ValueError, match="--streaming with --do_train needs --max_steps N"):
        check_streaming_args(streaming_data_args(), training)
    check_streaming_args(streaming_data_args(streaming=False), training)  # epochs work without a stream
    evaluating = SimpleNamespace(do_train=True, do_eval=True, max_steps=5)
    with pytest.raises(ValueError, match="--streaming with --do_eval and no validation data .* needs --max_eval_samples N"):
        check_streaming_args(streaming_data_args(), evaluating)
    check_streaming_args(streaming_data_args(max_eval_samples=16), evaluating)
    check_streaming_args(streaming_data_args(validation_file="validation.txt"), evaluating)
    # A hub dataset's splits are known once it is opened; train_and_eval_splits applies the same rule then.
    check_streaming_args(streaming_data_args(train_file=None, dataset_name="wikitext"), evaluating)


# ---- the shared data flags, checked before anything is loaded -------------------------------------------------


def test_the_data_flags_need_one_source_that_exists_and_numbers_in_range(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("a line\n")
    assert DataArguments(train_file=str(train)).train_file == str(train)
    with pytest.raises(ValueError, match="Need data: --dataset_name, or --train_file"):
        DataArguments()
    with pytest.raises(ValueError, match="--train_file would be ignored with --dataset_name"):
        DataArguments(dataset_name="wikitext", train_file=str(train))
    with pytest.raises(FileNotFoundError, match="--train_file .*missing.txt: no such file"):
        DataArguments(train_file=str(tmp_path / "missing.txt"))
    for values, message in [(dict(max_train_samples=0), "--max_train_samples=0 is invalid"),
                            (dict(validation_split_percentage=100), "--validation_split_percentage=100 is invalid")]:
        with pytest.raises(ValueError, match=message):
            DataArguments(train_file=str(train), **values)


def test_packing_cannot_stream_and_counts_sequences_from_one(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Packed(PackingArguments, DataArguments):
        pass

    train = tmp_path / "train.txt"
    train.write_text("a line\n")
    with pytest.raises(ValueError, match="--packing chooses which sequences share a row"):
        Packed(train_file=str(train), packing=True, streaming=True)
    with pytest.raises(ValueError, match="--max_sequences_per_row=0 is invalid"):
        Packed(train_file=str(train), max_sequences_per_row=0)
    with pytest.raises(ValueError, match="Need data"):  # the data checks still run
        Packed(packing=True)


def test_the_arguments_can_come_from_a_json_file(tmp_path, monkeypatch):
    module = script_module("run_mlm")
    arguments = tmp_path / "args.json"
    arguments.write_text(json.dumps({"dataset_name": "wikitext", "output_dir": str(tmp_path / "out"),
                                     "max_seq_length": 64, "learning_rate": 0.001, "report_to": "none"}))
    monkeypatch.setattr("sys.argv", ["run_mlm.py", str(arguments)])
    model_args, data_args, training_args = parse_script_args(module.ModelArguments, module.DataTrainingArguments)
    assert (data_args.dataset_name, data_args.max_seq_length, training_args.learning_rate) == ("wikitext", 64, 0.001)
    assert model_args.model_name_or_path is None


# ---- the command line as a new user meets it ------------------------------------------------------------------

SCRIPTS = ("run_pretraining", "run_mlm", "run_clm", "prepare_dataset")


def help_text(script: str, monkeypatch, capsys, flag: str = "--help") -> str:
    monkeypatch.setattr("sys.argv", [f"{script}.py", flag])
    module = script_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args() if script == "prepare_dataset" else module.main()
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_opens_with_a_description_and_an_example_of_known_flags(script, monkeypatch, capsys):
    text = help_text(script, monkeypatch, capsys)
    opening = text[: text.index("usage:")]
    first_paragraph, _, rest = opening.partition("\n\n")
    assert len(first_paragraph.split()) > 30, "one paragraph saying what the script does"
    example = rest[rest.index(f"python {script}.py"):]
    everything = text if script == "prepare_dataset" else help_text(script, monkeypatch, capsys, "--help-all")
    for flag in re.findall(r"(--\w+)", example):
        assert re.search(rf"^\s+{flag}\b", everything, re.MULTILINE), f"{flag} of the example is not a flag of {script}"
    assert "\\\n" in example and "\\\\" not in example  # one backslash ends each continued line, as in bash


def quick_start_commands() -> list[tuple[str, list[str]]]:
    """(script, its flags) of every command of the quick starts: quickstart.sh and README's quick-start bash blocks."""
    with open(f"{REPO}/README.md") as handle:
        blocks = [lines for lines in bash_blocks(handle.read()) if "ipu_trainer.cli.offline_assets quickstart" in lines[0]]
    with open(f"{REPO}/quickstart.sh") as handle:
        blocks.append([line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")])
    commands = []
    for lines in blocks:
        text = "\n".join(lines)
        for match in re.finditer(r"python (\w+)\.py(.*?)(?=\n(?:python|if|fi) |\n(?:fi)$|\Z)", text, re.DOTALL):
            commands.append((match[1], re.findall(r"\s(--\w+)", match[2])))
    return commands


def test_help_lists_every_flag_of_the_readme_quick_starts(monkeypatch, capsys):
    commands = quick_start_commands()
    assert {script for script, _ in commands} == set(SCRIPTS)
    for script, flags in commands:
        text = help_text(script, monkeypatch, capsys)
        for flag in flags:
            assert re.search(rf"^\s+{flag}\b", text, re.MULTILINE), f"{script}.py --help does not list {flag}"


@pytest.mark.parametrize(
    "script, flags, line",
    [
        ("run_clm", ["--learning_rate", "abc"], "error: --learning_rate 'abc': expected a number, e.g. --learning_rate 5e-05"),
        ("run_mlm", ["--max_steps", "x"], "error: --max_steps 'x': expected a whole number"),
        ("run_pretraining", ["--do_train", "maybe"], "error: --do_train: Truthy value expected: got maybe but expected "
                                                      "one of yes/no, true/false, t/f, y/n, 1/0 (case insensitive)."),
        ("run_clm", ["--lr_scheduler_type", "linearr"], "error: --lr_scheduler_type: invalid choice: 'linearr' (choose "
                                                         "from 'linear', "),
        ("run_clm", ["--max_steps"], "error: --max_steps: expected one argument"),
        ("prepare_dataset", ["--max_seq_length", "x"], "error: --max_seq_length 'x': expected a whole number"),
        ("prepare_dataset", [], "error: the following arguments are required: --output_dir (--help lists the flags)"),
    ],
)
def test_a_value_argparse_refuses_is_one_error_line_naming_the_flag(script, flags, line, monkeypatch, capsys):
    output_dir = [] if script == "prepare_dataset" and not flags else ["--output_dir", "unused"]
    monkeypatch.setattr("sys.argv", [f"{script}.py", *output_dir, *flags])
    assert run_cli(script_module(script).main) == 2
    out, err = capsys.readouterr()
    assert "usage:" not in out + err
    assert len(err.splitlines()) == 1 and err.startswith(line), err
