"""The offline quick-start assets: the same bytes on every run, a tokenizer transformers loads, and a second
`python -m ipu_trainer.cli.offline_assets` that leaves the assets it built and refuses to replace anything else."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from ipu_trainer.cli import offline_assets
from ipu_trainer.cli.offline_assets import (
    MANIFEST_NAME, WORDPIECE_SPECIAL_TOKENS, asset_files, quickstart_assets, sha256_of, wordpiece_vocabulary,
)


@pytest.mark.parametrize("text, merge", [("cd cd ab ab", "ab"), ("cd cd cd ab ab", "cd")])
def test_wordpiece_merges_the_most_frequent_pair_and_ties_in_string_order(text, merge):
    # After the specials and the four characters there is room for one merge: "ab" and "cd" tie in the first
    # text (the first in string order wins, wherever it stands in the text); "cd" is more frequent in the second.
    vocabulary = wordpiece_vocabulary([text], vocab_size=len(WORDPIECE_SPECIAL_TOKENS) + 5,
                                      special_tokens=WORDPIECE_SPECIAL_TOKENS)
    assert vocabulary == WORDPIECE_SPECIAL_TOKENS + ["##b", "##d", "a", "c", merge]


def test_wordpiece_stops_below_the_minimum_frequency():
    vocabulary = wordpiece_vocabulary(["ab ab cd"], vocab_size=100, special_tokens=WORDPIECE_SPECIAL_TOKENS)
    assert vocabulary[-1] == "ab"


def test_the_tokenizers_load_with_auto_tokenizer_and_tokenize_a_sentence(assets):
    from transformers import AutoTokenizer

    sentence = "The return statement leaves the current function call."
    bert = AutoTokenizer.from_pretrained(assets["tokenizer"])
    assert len(bert) == 2000 and set(bert.all_special_tokens) == set(WORDPIECE_SPECIAL_TOKENS)
    ids = bert(sentence)["input_ids"]
    assert bert.unk_token_id not in ids
    assert bert.decode(ids, skip_special_tokens=True) == sentence.lower()
    gpt2 = AutoTokenizer.from_pretrained(assets["bpe_tokenizer"])
    assert len(gpt2) == 1000 and gpt2.eos_token == "<|endoftext|>"
    assert gpt2.decode(gpt2(sentence)["input_ids"]) == sentence


@pytest.mark.slow
def test_the_assets_are_the_same_bytes_under_every_hash_seed(tmp_path):
    # Each process also seeds the tokenizers library's hash maps afresh, whose order decided WordPiece's ties.
    command = [sys.executable, "-m", "ipu_trainer.cli.offline_assets"]
    runs = {seed: subprocess.Popen(command + [str(tmp_path / seed)], cwd=REPO, stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, PYTHONHASHSEED=seed))
            for seed in ("0", "3")}
    for run in runs.values():
        assert run.wait(timeout=600) == 0, run.stderr.read()[-2000:]
    checksums = [{name: sha256_of(os.path.join(folder, name)) for name in asset_files(folder) + [MANIFEST_NAME]}
                 for folder in (str(tmp_path / seed) for seed in runs)]
    assert len(checksums[0]) == 10 and checksums[0] == checksums[1]


# ---- reuse: the builder is replaced by a quick one writing the same file names ----------------------------

def quick_build(output_dir, **kwargs):
    os.makedirs(os.path.join(output_dir, "tokenizer"))
    for name in ("train.txt", "validation.txt", "tokenizer/vocab.txt"):
        with open(os.path.join(output_dir, name), "w") as handle:
            handle.write(f"built {name}\n")


@pytest.fixture
def builds(monkeypatch):
    """The folders each quickstart_assets call built in (by quick_build)."""
    folders = []
    monkeypatch.setattr(offline_assets, "write_quickstart_assets",
                        lambda output_dir, **kwargs: folders.append(output_dir) or quick_build(output_dir))
    return folders


def test_a_second_run_leaves_the_assets_it_built(builds, tmp_path, caplog):
    folder = str(tmp_path / "quickstart")
    quickstart_assets(folder)
    files = asset_files(folder)
    assert files == ["tokenizer/vocab.txt", "train.txt", "validation.txt"]
    with open(os.path.join(folder, MANIFEST_NAME)) as handle:  # sha256sum's format: `sha256sum -c` checks it
        assert handle.read() == "".join(f"{sha256_of(os.path.join(folder, name))}  {name}\n" for name in files)
    written = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in files + [MANIFEST_NAME]}
    with caplog.at_level("INFO"):
        paths = quickstart_assets(folder)
    assert len(builds) == 1 and "already holds the quick-start assets" in caplog.text
    assert {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in written} == written
    assert paths["tokenizer"] == os.path.join(folder, "tokenizer")
    assert sorted(os.listdir(folder)) == [MANIFEST_NAME, "tokenizer", "train.txt", "validation.txt"]


def test_a_deleted_asset_is_built_again(builds, tmp_path):
    folder = str(tmp_path)
    quickstart_assets(folder)
    os.remove(os.path.join(folder, "train.txt"))
    quickstart_assets(folder)
    assert len(builds) == 2 and os.path.exists(os.path.join(folder, "train.txt"))


@pytest.mark.parametrize("case", ["no manifest", "edited since"])
def test_a_file_it_did_not_write_is_refused_and_kept(case, builds, tmp_path, capsys):
    folder = str(tmp_path)
    if case == "edited since":
        quickstart_assets(folder)
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    with open(os.path.join(folder, "tokenizer", "vocab.txt"), "w") as handle:
        handle.write("mine\n")
    built = len(builds)
    assert offline_assets.main([folder]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: " + os.path.join(folder, "tokenizer", "vocab.txt")) and "move it away" in line
    assert len(builds) == built
    with open(os.path.join(folder, "tokenizer", "vocab.txt")) as handle:
        assert handle.read() == "mine\n"


def test_a_build_that_stops_leaves_nothing_behind(monkeypatch, tmp_path):
    def failing_build(output_dir, **kwargs):
        quick_build(output_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(offline_assets, "write_quickstart_assets", failing_build)
    with pytest.raises(KeyboardInterrupt):
        quickstart_assets(str(tmp_path))
    assert os.listdir(tmp_path) == []
