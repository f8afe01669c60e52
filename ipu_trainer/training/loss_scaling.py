"""What a static float16 loss scale does when updates overflow: each skipped update is logged with a count, and a
run of them stops the run with one error line.

A static scale (`--loss_scaling N` without `--auto_loss_scaling`) never changes (`run.precision.StaticLossScaler`),
so an update whose gradients overflow at that scale is skipped rather than applied with inf or NaN, and the next
update at the same scale usually overflows again: left alone, such a run would go on to its last step with its
weights frozen. The processes of a torchrun all see the same all-reduced gradients, so they skip the same updates
and stop together.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

# Overflowing updates in a row after which a static loss scale is taken to be wrong for this run.
MAX_SKIPPED_UPDATES_IN_A_ROW = 10


class StaticLossScaleError(ValueError):
    """Too many float16 updates in a row overflowed at the static loss scale (a user error: the scale is wrong)."""


class StaticLossScaleGuard(TrainerCallback):
    """Counts the float16 updates skipped at a static loss scale: `record` after every weight update, which the
    upstream loop's last update of each step calls through `on_optimizer_step`; `update_was_skipped` answers
    for the update just made (accelerate's `optimizer_step_was_skipped`)."""

    def __init__(self, loss_scale: float, update_was_skipped: Callable[[], bool]) -> None:
        self.loss_scale = loss_scale
        self.update_was_skipped = update_was_skipped
        self.skipped_in_a_row = 0
        self.skipped_in_run = 0
        self.step = 0

    def record(self, skipped: Optional[bool] = None) -> None:
        """After one weight update: `skipped` (default: `update_was_skipped()`) when the GradScaler found an overflow
        and did not apply it."""
        if skipped is None:
            skipped = self.update_was_skipped()
        if not skipped:
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += 1
        self.skipped_in_run += 1
        if self.skipped_in_a_row >= MAX_SKIPPED_UPDATES_IN_A_ROW:
            raise StaticLossScaleError(
                f"{self.skipped_in_a_row} weight updates in a row overflowed in float16 at the static loss scale "
                f"{self.loss_scale:g} and were skipped (step {self.step + 1}), so the weights stopped changing: lower "
                "--loss_scaling, or pass --auto_loss_scaling for a scale that adapts (it starts at --loss_scaling)"
            )
        logger.warning(
            "Step %d: a float16 weight update overflowed at the static loss scale %g and was skipped (%d in a row, %d "
            "in this run; %d in a row stop the run).", self.step + 1, self.loss_scale, self.skipped_in_a_row,
            self.skipped_in_run, MAX_SKIPPED_UPDATES_IN_A_ROW,
        )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.record(self.update_was_skipped())
