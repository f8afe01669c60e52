"""`optimum.graphcore.modeling_utils`: the layer-placement helpers, and the IPU-only names as clear errors.

`get_layer_ipu` and `split_encoder_decoder_ipu_config` work without an IPU (ipu_trainer's own). The
helpers that built poptorch pipelines (`to_pipelined`, `recomputation_checkpoint`, `outline_attribute`)
exist and raise one error saying they have no meaning off the IPU.
"""

from __future__ import annotations

from typing import Any, NoReturn

from ipu_trainer.config.ipu_config import ipu_only_error
from ipu_trainer.config.layer_placement import get_layer_ipu, split_encoder_decoder_ipu_config


def to_pipelined(model: Any, ipu_config: Any, force: bool = False) -> NoReturn:
    """optimum-graphcore's pipelined model for the IPU; IPUTrainer takes the model as it is here."""
    raise ipu_only_error("to_pipelined()")


def recomputation_checkpoint(module: Any) -> NoReturn:
    """A poptorch recomputation checkpoint; `recompute_checkpoint_every_layer` in the IPU config does this here."""
    raise ipu_only_error("recomputation_checkpoint()")


def outline_attribute(module: Any, value: str) -> NoReturn:
    """A poptorch outlining attribute."""
    raise ipu_only_error("outline_attribute()")


__all__ = [
    "get_layer_ipu",
    "outline_attribute",
    "recomputation_checkpoint",
    "split_encoder_decoder_ipu_config",
    "to_pipelined",
]
