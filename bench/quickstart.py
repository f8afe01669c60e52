#!/usr/bin/env python
"""The README's main quick start, in full: `bash quickstart.sh` (3000 steps) in a fresh folder, timed, and its
closing table compared with the one the README shows.

The tests run the same script on a shorter schedule; this is where the full schedule, its numbers and its
next-sentence accuracy are checked. Float32 results differ between CPUs only in the last digits (other
kernels, other summation orders), so a difference up to `--tolerance` passes.

    python bench/quickstart.py [--tolerance 0.02] [--keep FOLDER]

Prints the table, the wall time and the training time, then `matches README: yes|no`; exit code 1 on no.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("run_pretraining.py", "run_mlm.py", "run_clm.py", "prepare_dataset.py", "ipu_config.json", "quickstart.sh")
ROW = re.compile(r"^(masked-token loss|masked-token accuracy|next-sentence accuracy|held-out samples)\s+(\S+)\s+(\S+)$")


def table_rows(text: str) -> dict[str, tuple[str, str]]:
    """{row name: (before, after)} of the quick start's closing table in `text` (and the held-out count)."""
    rows = {}
    for line in text.splitlines():
        heading = re.match(r"^on (\d+) held-out samples\s+before training\s+after (\d+) steps", line.strip())
        if heading:
            rows["held-out samples"] = (heading.group(1), heading.group(2))
        match = ROW.match(line.strip())
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def readme_table() -> dict[str, tuple[str, str]]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index("## Quick start"):text.index("## Tests")]
    return table_rows(section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--keep", help="run in this (new) folder and keep it, instead of a temporary one")
    args = parser.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="quickstart-")
    os.makedirs(folder, exist_ok=True)
    for name in FILES:
        os.symlink(os.path.join(REPO, name), os.path.join(folder, name))
    environment = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    environment.pop("QUICKSTART_MAX_STEPS", None)
    start = time.perf_counter()
    done = subprocess.run(["bash", "quickstart.sh"], cwd=folder, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        return 1
    with open(os.path.join(folder, "quickstart", "output", "train_results.json"), encoding="utf-8") as handle:
        training = json.load(handle)["train_runtime"]
    printed = done.stdout.strip().splitlines()
    print("\n".join(printed[-8:]))
    print(f"wall time: {wall:.0f} s, training: {training:.0f} s (load average {os.getloadavg()[0]:.1f})")
    measured, expected = table_rows(done.stdout), readme_table()
    matches = measured.keys() == expected.keys() and all(
        abs(float(a) - float(b)) <= args.tolerance
        for name in expected for a, b in zip(measured[name], expected[name])
    )
    print(f"matches README: {'yes' if matches else 'no'}")
    return 0 if matches else 1


if __name__ == "__main__":
    sys.exit(main())
