"""The scripts' command line as a new user meets it: `--help` opens with what the script does and an example and
lists every flag README's quick starts use; a value argparse refuses is one `error:` line naming the flag."""

import re

import pytest
from conftest import REPO, bash_blocks, script_module

from ipu_trainer.cli.startup import run_cli

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
    """(script, its flags) of every command in README's quick-start bash blocks."""
    with open(f"{REPO}/README.md") as handle:
        blocks = [lines for lines in bash_blocks(handle.read()) if "ipu_trainer.cli.offline_assets quickstart" in lines[0]]
    commands = []
    for lines in blocks:
        text = "\n".join(lines)
        for match in re.finditer(r"python (\w+)\.py(.*?)(?=\npython |\Z)", text, re.DOTALL):
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
