"""The packing benchmark runs end to end (tiny sizes, one data kind) and builds both kinds of data."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import packing as bench_packing  # noqa: E402


@pytest.mark.slow  # the whole benchmark in a subprocess
def test_bench_prints_the_three_sides_the_bound_and_the_speedup():
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "packing.py"), "--tiny", "--kinds", "lines", "--lengths", "64",
         "--steps", "2", "--warmup-steps", "1", "--rounds", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert any(re.match(r"lines at 64 .*p = \d+\.\d%, bound 1/\(1-p\) = \d+\.\d\dx", line) for line in lines), done.stdout
    row = r"\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d\s+\d+\s+\d+\.\d%\s+\d+$"  # seq/s, (mean), seq/CPU-s, tokens/s, padding, micro-batch
    for label in ("(a) packed", "(a0) padded", "(b) padded"):
        assert any(line.startswith(label) and re.search(row, line) for line in lines), (label, done.stdout)
    assert any(re.match(r"\(a\) over \(a0\): \d+\.\d\dx = \d+% of the bound", line) for line in lines), done.stdout
    assert re.fullmatch(r"speedup: \d+\.\d\dx", lines[-1]), done.stdout


def test_bench_builds_sentence_pairs_with_short_ones_and_lines(tokenizer):
    pairs = bench_packing.build_data("pairs", 128, tokenizer, 700, seed=0)
    assert len(pairs) >= 700 and "next_sentence_label" in pairs.column_names
    lengths = [sum(mask) for mask in pairs["attention_mask"]]
    assert min(lengths) < 64 and max(lengths) == 128  # some short pairs (short_seq_prob), most full
    lines = bench_packing.build_data("lines", 128, tokenizer, 10, seed=0)
    assert "special_tokens_mask" in lines.column_names and max(len(ids) for ids in lines["input_ids"]) <= 128
