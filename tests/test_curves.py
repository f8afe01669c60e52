"""Training curves: the panels drawn from a log history, the picture written, and `python -m ipu_trainer.plot`."""

import json
import os

import pytest
from matplotlib.image import imread

from ipu_trainer import plot
from ipu_trainer.training.curves import (
    CURVES_NAME, DPI, PANEL_INCHES, draw_curves, save_figure, series_of, trainer_state_of, write_training_curves,
)

PANEL_PIXELS = (round(PANEL_INCHES[1] * DPI), round(PANEL_INCHES[0] * DPI))  # (height, width)


def pretraining_history(steps: int = 20, every: int = 5) -> list[dict]:
    """What run_pretraining.py logs: training lines (the first without throughput), evaluations with the two
    losses and accuracies apart, and the end-of-training summary."""
    history = []
    for step in range(every, steps + 1, every):
        line = {"loss": 10.0 / step, "grad_norm": 1.0, "learning_rate": 1e-3 * (1 - step / steps), "epoch": 0.1,
                "step": step}
        if step > every:
            line.update(samples_per_second=100.0 + step, tokens_per_second=12800.0 + step)
        history.append(line)
        if step % 10 == 0:
            history.append({"eval_loss": 5.0 / step, "eval_mlm_loss": 4.0 / step, "eval_nsp_loss": 1.0 / step,
                            "eval_mlm_accuracy": step / 40, "eval_nsp_accuracy": 0.5, "eval_runtime": 1.5,
                            "eval_samples_per_second": 30.0, "epoch": 0.1, "step": step})
    history.append({"train_runtime": 9.0, "train_samples_per_second": 99.0, "train_loss": 1.0, "total_flos": 1e12,
                    "epoch": 0.1, "step": steps})
    return history


def panels_of(figure) -> dict[str, list[str]]:
    """Panel title -> the labels of its lines."""
    return {axes.get_title(): [line.get_label() for line in axes.get_lines()] for axes in figure.axes}


def test_a_pretraining_history_draws_its_five_panels(tmp_path):
    path = write_training_curves(pretraining_history(), str(tmp_path))

    assert path == str(tmp_path / CURVES_NAME)
    assert sorted(os.listdir(tmp_path)) == [CURVES_NAME]  # the temporary file is gone
    image = imread(path)
    # five panels: two wide, three high
    assert image.shape[:2] == (3 * PANEL_PIXELS[0], 2 * PANEL_PIXELS[1])
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas

    panels = panels_of(draw_curves({"run": pretraining_history()}))
    assert panels == {
        "loss": ["loss", "eval_loss", "eval_mlm_loss", "eval_nsp_loss"],  # not train_loss, the run's mean
        "accuracy": ["eval_mlm_accuracy", "eval_nsp_accuracy"],
        "learning rate": ["learning_rate"],
        "samples/s": ["samples_per_second"],
        "tokens/s": ["tokens_per_second"],
    }


def test_the_lines_hold_the_history_against_the_step():
    figure = draw_curves({"run": pretraining_history()})
    loss_axes = next(axes for axes in figure.axes if axes.get_title() == "loss")
    lines = {line.get_label(): line for line in loss_axes.get_lines()}
    assert list(lines["loss"].get_xdata()) == [5, 10, 15, 20]
    assert list(lines["loss"].get_ydata()) == [2.0, 1.0, 10 / 15, 0.5]
    assert list(lines["eval_loss"].get_xdata()) == [10, 20] and lines["eval_loss"].get_marker() == "o"
    throughput = next(axes for axes in figure.axes if axes.get_title() == "samples/s").get_lines()[0]
    assert list(throughput.get_xdata()) == [10, 15, 20]  # the first window is not reported


def test_only_a_training_loss_draws_one_panel(tmp_path):
    history = [{"loss": 3.0 - step / 10, "step": step} for step in range(1, 11)]
    image = imread(write_training_curves(history, str(tmp_path)))

    assert image.shape[:2] == PANEL_PIXELS
    figure = draw_curves({"run": history})
    assert panels_of(figure) == {"loss": ["loss"]}
    assert figure.axes[0].get_legend() is None  # the title says what the one line is


def test_a_history_with_nothing_to_draw_writes_nothing(tmp_path):
    history = [{"train_runtime": 1.0, "train_loss": 2.0, "step": 2}]
    assert draw_curves({"run": history}) is None
    assert write_training_curves(history, str(tmp_path)) is None
    assert os.listdir(tmp_path) == []


def test_points_that_cannot_be_drawn_are_left_out():
    history = [{"loss": float("nan"), "step": 1}, {"loss": 2.0, "step": 2}, {"loss": 1.0},
               {"loss": float("inf"), "step": 3}, {"loss": True, "step": 4}, {"loss": "1.0", "step": 5},
               {"loss": 1.5, "step": 6}]
    assert series_of(history) == {"loss": ([2, 6], [2.0, 1.5])}


def test_a_failed_write_leaves_the_old_picture_and_no_temporary_file(tmp_path):
    figure = draw_curves({"run": pretraining_history()})
    path = tmp_path / "curves.notaformat"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="not supported"):
        save_figure(figure, str(path))
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["curves.notaformat"]


# ---- python -m ipu_trainer.plot ---------------------------------------------------------------------------

def write_state(folder, history: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 20, "log_history": history}))


def test_the_newest_checkpoint_state_stands_in_for_a_run_still_going(tmp_path):
    write_state(tmp_path / "checkpoint-5", [])
    write_state(tmp_path / "checkpoint-10", [])
    (tmp_path / "checkpoint-15").mkdir()  # begun, no state written yet
    assert trainer_state_of(str(tmp_path)) == str(tmp_path / "checkpoint-10" / "trainer_state.json")
    write_state(tmp_path, [])
    assert trainer_state_of(str(tmp_path)) == str(tmp_path / "trainer_state.json")


def test_plot_overlays_two_runs_in_one_picture(tmp_path, monkeypatch, capsys):
    write_state(tmp_path / "lamb", pretraining_history())
    write_state(tmp_path / "adam" / "checkpoint-10", pretraining_history(steps=10))
    monkeypatch.chdir(tmp_path)

    assert plot.main(["lamb", "adam"]) == 0

    out = capsys.readouterr().out
    assert out.strip() == f"wrote {CURVES_NAME} (2 runs: lamb, adam)"
    assert imread(tmp_path / CURVES_NAME).shape[:2] == (3 * PANEL_PIXELS[0], 2 * PANEL_PIXELS[1])
    # each run in every panel, in its own colour
    figure = draw_curves({"lamb": pretraining_history(), "adam": pretraining_history(steps=10)})
    loss = panels_of(figure)["loss"]
    assert loss[:4] == ["lamb loss", "lamb eval_loss", "lamb eval_mlm_loss", "lamb eval_nsp_loss"]
    assert loss[4:] == ["adam loss", "adam eval_loss", "adam eval_mlm_loss", "adam eval_nsp_loss"]
    colours = {line.get_label().split()[0]: line.get_color() for line in figure.axes[0].get_lines()}
    assert colours["lamb"] != colours["adam"]


def test_plot_writes_where_output_says(tmp_path, capsys):
    write_state(tmp_path / "run", pretraining_history())
    target = tmp_path / "compare.svg"
    assert plot.main([str(tmp_path / "run"), "--output", str(target)]) == 0
    assert target.read_text().lstrip().startswith("<?xml")
    assert f"wrote {target}" in capsys.readouterr().out


def test_runs_with_the_same_folder_name_are_labelled_by_path():
    assert plot.run_labels(["a/out", "b/out/"]) == ["a/out", "b/out"]
    assert plot.run_labels(["a/lamb", "b/adam/"]) == ["lamb", "adam"]


@pytest.mark.parametrize("make, says", [("empty", "bad holds no trainer_state.json"),
                                        ("missing", "bad: no such folder"),
                                        ("broken", "bad/trainer_state.json is not a trainer state")])
def test_plot_on_a_folder_without_state_is_one_error_line(make, says, tmp_path, monkeypatch, capsys):
    write_state(tmp_path / "good", pretraining_history())
    bad = tmp_path / "bad"
    if make == "empty":
        bad.mkdir()
    elif make == "broken":
        bad.mkdir()
        (bad / "trainer_state.json").write_text("{not json")
    monkeypatch.chdir(tmp_path)

    assert plot.main(["good", "bad"]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {says}"), lines
    assert not (tmp_path / CURVES_NAME).exists()


def test_plot_to_a_file_it_cannot_write_is_one_error_line(tmp_path, capsys):
    write_state(tmp_path / "run", pretraining_history())
    assert plot.main([str(tmp_path / "run"), "--output", str(tmp_path / "nowhere" / "c.png")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"error: cannot write {tmp_path / 'nowhere' / 'c.png'}: No such file or directory"]
    assert plot.main([str(tmp_path / "run"), "--output", str(tmp_path / "c.foo")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --output {tmp_path / 'c.foo'}: Format 'foo'"), lines
