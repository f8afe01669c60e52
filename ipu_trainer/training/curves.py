"""Training curves: a picture of a run's `log_history` (the list in `trainer_state.json`) against the step.

One panel per kind of value, each left out when the history has none of it:

- loss: the training loss of each log line (`loss`) and every evaluation loss (`eval_loss`, `eval_mlm_loss`,
  `eval_nsp_loss`, ...), evaluation points marked;
- accuracy: every `...accuracy` value (`eval_accuracy`, `eval_mlm_accuracy`, `eval_nsp_accuracy`, ...);
- learning rate, samples/s and tokens/s (the throughput keys of `throughput.py`), and MFU where it was measured.

Several runs can share one figure (`python -m ipu_trainer.plot`): each run keeps one colour, and within a panel
each value its own line style. Drawn with matplotlib's object API on an Agg canvas, not pyplot, so it needs no
display and touches no global figure state (safe beside a training run's threads).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .checkpoints import TRAINER_STATE_NAME, list_checkpoints

CURVES_NAME = "training_curves.png"
PANEL_INCHES = (6.4, 3.6)
DPI = 100
LINE_STYLES = ("-", "--", ":", "-.")

# step -> value points of one key, in step order.
Series = tuple[list[int], list[float]]


@dataclass(frozen=True)
class Panel:
    title: str
    holds: Callable[[str], bool]  # whether a log_history key is drawn in this panel


PANELS = (
    # `train_loss` (the run's mean loss, on the end-of-training line) is left out: one point that is not a curve.
    Panel("loss", lambda key: key == "loss" or (key.startswith("eval_") and key.endswith("loss"))),
    Panel("accuracy", lambda key: key.endswith("accuracy")),
    Panel("learning rate", lambda key: key == "learning_rate"),
    Panel("samples/s", lambda key: key == "samples_per_second"),
    Panel("tokens/s", lambda key: key == "tokens_per_second"),
    Panel("MFU", lambda key: key == "mfu"),
)


def series_of(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Series]:
    """Every numeric key of the history as (steps, values), in step order. Entries without a step and values
    that are not finite numbers (a NaN loss has no place on an axis) are left out."""
    points: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        for key, value in entry.items():
            if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                points.setdefault(key, []).append((step, float(value)))
    found = {}
    for key, pairs in points.items():
        pairs.sort(key=lambda pair: pair[0])  # stable: two evaluations at one step keep their order
        found[key] = ([step for step, _ in pairs], [value for _, value in pairs])
    return found


def draw_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> Optional[Figure]:
    """A figure of the panels that have data, for the runs `{label: log_history}`; None when no panel has any.
    Panels fill a grid two wide (one panel: one wide), each `PANEL_INCHES` at `DPI`."""
    run_series = {label: series_of(history) for label, history in runs.items()}
    panels = []
    for panel in PANELS:
        keys = sorted({key for found in run_series.values() for key in found if panel.holds(key)},
                      key=lambda key: (key != "loss", key))  # the training loss first
        if keys:
            panels.append((panel, keys))
    if not panels:
        return None
    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    several = len(run_series) > 1
    for index, (panel, keys) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for run_index, (label, found) in enumerate(run_series.items()):
            for key_index, key in enumerate(keys):
                if key not in found:
                    continue
                steps, values = found[key]
                # One run: a colour per value. Several: a colour per run, a line style per value.
                color = f"C{(run_index if several else key_index) % 10}"
                style = LINE_STYLES[key_index % len(LINE_STYLES)] if several else "-"
                name = (label if len(keys) == 1 else f"{label} {key}") if several else key
                # Evaluations are few (often one, at the end) and a lone point draws no line: mark them.
                marker = "o" if key.startswith("eval_") or len(steps) == 1 else None
                axes.plot(steps, values, color=color, linestyle=style, marker=marker, markersize=3,
                          label=name)
        axes.set_title(panel.title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if several or len(keys) > 1:  # a lone line is named by its panel's title
            axes.legend(fontsize="small")
    return figure


def save_figure(figure: Figure, path: str) -> None:
    """Write `figure` to `path` in the format its extension names (PNG without one), through a temporary file in
    the same folder renamed over `path`: a reader never sees half a picture, and a failed write leaves no file."""
    extension = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as handle:
            figure.savefig(handle, format=extension)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_training_curves(log_history: Sequence[Mapping[str, Any]], output_dir: str) -> Optional[str]:
    """`training_curves.png` of one run in its `output_dir`; the path written, or None when the history has
    nothing to draw (then nothing is written)."""
    figure = draw_curves({os.path.basename(os.path.normpath(output_dir)): log_history})
    if figure is None:
        return None
    path = os.path.join(output_dir, CURVES_NAME)
    save_figure(figure, path)
    return path


def trainer_state_of(output_dir: str) -> str:
    """The `trainer_state.json` of a run's folder: the top-level one a finished run saves, else that of its newest
    `checkpoint-N` (a run still going, or stopped). FileNotFoundError names the folder when it has neither."""
    candidates = [output_dir] + list_checkpoints(output_dir)
    for folder in candidates:
        path = os.path.join(folder, TRAINER_STATE_NAME)
        if os.path.isfile(path):
            return path
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"{output_dir}: no such folder")
    raise FileNotFoundError(f"{output_dir} holds no {TRAINER_STATE_NAME} (neither at its top nor in a checkpoint-N "
                            "folder): is it a run's --output_dir?")


def read_log_history(path: str) -> list[dict[str, Any]]:
    """The `log_history` of a `trainer_state.json`; ValueError when the file is not one."""
    try:
        with open(path, encoding="utf-8") as handle:
            history = json.load(handle).get("log_history")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{path} is not a trainer state ({error})") from None
    if not isinstance(history, list):
        raise ValueError(f"{path} has no log_history list")
    return history
