"""What a finished run learned, in a few lines: `python -m ipu_trainer.cli.run_summary OUTPUT_DIR`.

A table of the evaluation before training (`--eval_on_start`, step 0) against the one after it, then where
the model and its training curves are. The quick start ends with it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

# The metrics shown, in this order, when the run reported them.
SHOWN = (
    ("eval_mlm_loss", "masked-token loss"),
    ("eval_mlm_accuracy", "masked-token accuracy"),
    ("eval_nsp_accuracy", "next-sentence accuracy"),
    ("eval_loss", "loss"),
    ("eval_accuracy", "accuracy"),
)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def evaluations(output_dir: str) -> tuple[Optional[dict], dict]:
    """(the evaluation at step 0, or None without --eval_on_start; the final one, from eval_results.json)."""
    after = _read_json(os.path.join(output_dir, "eval_results.json"))
    history = _read_json(os.path.join(output_dir, "trainer_state.json"))["log_history"]
    before = next((entry for entry in history if "eval_loss" in entry and entry.get("step") == 0), None)
    return before, after


def summary(output_dir: str) -> str:
    """The table and the paths, as printed."""
    before, after = evaluations(output_dir)
    steps = _read_json(os.path.join(output_dir, "trainer_state.json")).get("global_step")
    samples = after.get("eval_samples")
    heading = f"on {samples} held-out samples" if samples is not None else "on the evaluation data"
    rows = [(f"{heading}", "before training", f"after {steps} steps")]
    pretraining = "eval_mlm_loss" in after
    for key, name in SHOWN:
        if key not in after or (pretraining and key in ("eval_loss", "eval_accuracy")):
            continue
        earlier = f"{before[key]:.3f}" if before is not None and key in before else "-"
        rows.append((name, earlier, f"{after[key]:.3f}"))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.append("")
    lines.append(f"model: {output_dir}")
    curves = os.path.join(output_dir, "training_curves.png")
    if os.path.isfile(curves):
        lines.append(f"training curves: {curves}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m ipu_trainer.cli.run_summary OUTPUT_DIR", file=sys.stderr)
        return 2
    output_dir = argv[0]
    try:
        print(summary(output_dir))
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {output_dir} holds no finished, evaluated run ({error}): run the training with --do_eval "
              "first", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
