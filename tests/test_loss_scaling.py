"""A static float16 loss scale: skipped updates are counted, and 10 in a row stop the run (the trainer-level runs
are in tests/test_trainer.py)."""

import pytest

from ipu_trainer.training.loss_scaling import MAX_SKIPPED_UPDATES_IN_A_ROW, StaticLossScaleError, StaticLossScaleGuard


def test_a_clean_update_resets_the_count_of_overflows_in_a_row(caplog):
    skipped = [True]
    guard = StaticLossScaleGuard(1024.0, lambda: skipped[0])
    with caplog.at_level("WARNING", logger="ipu_trainer"):
        for _ in range(MAX_SKIPPED_UPDATES_IN_A_ROW - 1):
            guard.record()
        guard.record(skipped=False)
        for _ in range(MAX_SKIPPED_UPDATES_IN_A_ROW - 1):
            guard.record()  # 18 overflows, never 10 in a row: the run goes on
    assert (guard.skipped_in_a_row, guard.skipped_in_run) == (9, 18)
    assert "(9 in a row, 18 in this run; 10 in a row stop the run)" in caplog.records[-1].getMessage()
    with pytest.raises(StaticLossScaleError, match="10 weight updates in a row overflowed .* static loss scale 1024"):
        guard.record()
    assert issubclass(StaticLossScaleError, ValueError)  # run_cli's user errors: one error: line
