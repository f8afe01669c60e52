"""The before/after table a run ends with (the quick start prints it)."""

import json

from ipu_trainer.cli.run_summary import main, summary


def finished_run(folder, pretraining=True):
    before = {"eval_mlm_loss": 7.64, "eval_mlm_accuracy": 0.0, "eval_nsp_accuracy": 0.559} if pretraining else \
        {"eval_loss": 6.93, "eval_accuracy": 0.004}
    after = {"eval_mlm_loss": 5.39, "eval_mlm_accuracy": 0.162, "eval_nsp_accuracy": 0.728} if pretraining else \
        {"eval_loss": 4.73, "eval_accuracy": 0.146}
    history = [{"step": 0, "eval_loss": 1.0, **before}, {"step": 100, "loss": 6.0}, {"step": 3000, "eval_loss": 0.5, **after}]
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3000, "log_history": history}))
    (folder / "eval_results.json").write_text(json.dumps({"eval_loss": 0.5, **after, "eval_samples": 503}))


def test_the_table_shows_each_metric_before_and_after_training(tmp_path):
    finished_run(tmp_path)
    lines = summary(str(tmp_path)).splitlines()
    assert lines[0].split() == ["on", "503", "held-out", "samples", "before", "training", "after", "3000", "steps"]
    assert lines[2].split() == ["masked-token", "loss", "7.640", "5.390"]
    assert lines[3].split() == ["masked-token", "accuracy", "0.000", "0.162"]
    assert lines[4].split() == ["next-sentence", "accuracy", "0.559", "0.728"]
    assert len(lines) == 7 and lines[6] == f"model: {tmp_path}"  # pretraining: its combined eval_loss is left out
    (tmp_path / "training_curves.png").write_bytes(b"png")
    assert summary(str(tmp_path)).splitlines()[-1] == f"training curves: {tmp_path / 'training_curves.png'}"


def test_a_language_model_run_shows_its_loss_and_accuracy(tmp_path):
    finished_run(tmp_path, pretraining=False)
    rows = [line.split() for line in summary(str(tmp_path)).splitlines()[2:4]]
    assert rows == [["loss", "6.930", "4.730"], ["accuracy", "0.004", "0.146"]]


def test_a_folder_without_results_is_one_error_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path} holds no finished, evaluated run")
