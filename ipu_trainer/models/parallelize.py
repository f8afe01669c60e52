"""Training-speed variants of upstream models: `parallelize(ipu_config)` with a way back, saved as upstream.

A variant keeps its upstream class's modules and parameter names. `parallelize` applies the IPU config's
speed settings as explicit module changes (activation recomputation, a chunked vocabulary projection) and
`deparallelize` undoes them, so a checkpoint saved from either state is a plain upstream checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Self

from torch import nn

from .layers import num_projection_chunks, set_projection_chunks, set_recomputation


class SaveAsUpstreamMixin:
    """`save_pretrained` that names `upstream_class` in `config.architectures` instead of the subclass.

    The training-speed subclasses keep upstream's parameter names, so their weights need no conversion;
    only the class name upstream stamps into the config would tie the checkpoint to this package.
    """

    upstream_class: type

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, push_to_hub: bool = False, **kwargs):
        hub_kwargs = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr") if key in kwargs}
        super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        self.config.architectures = [self.upstream_class.__name__]
        if is_main_process:
            self.config.save_pretrained(save_directory)
        if push_to_hub and is_main_process:
            # push_to_hub saves through this method into a temporary folder, so the rename above applies.
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            self.push_to_hub(repo_id, token=kwargs.get("token"), **hub_kwargs)


class ParallelizeMixin(SaveAsUpstreamMixin):
    """`parallelize(ipu_config)` / `deparallelize()` for a model with a vocabulary projection.

    A subclass names its `upstream_class` and says where its vocabulary projection lives
    (`vocab_projection_site`); everything else is the same for every model family.
    """

    def vocab_projection_site(self) -> tuple[nn.Module, str]:
        """`(owner, attribute)` such that `getattr(owner, attribute)` is the [H, V] vocabulary projection."""
        raise NotImplementedError

    @property
    def vocab_projection(self) -> nn.Module:
        """The vocabulary projection: an `nn.Linear`, or a `ChunkedVocabProjection` after `parallelize`."""
        owner, attribute = self.vocab_projection_site()
        return getattr(owner, attribute)

    def parallelize(self, ipu_config: Any) -> Self:
        """Apply the training-speed settings of `ipu_config` as explicit module changes.

        - `recompute_checkpoint_every_layer`: activation checkpointing around every layer.
        - the larger of `embedding_serialization_factor` / `projection_serialization_factor`, n > 1: the
          vocabulary projection becomes a `ChunkedVocabProjection` computing the training loss in n chunks, on
          the same Parameters (weight tying and state-dict keys unchanged); n = 1 restores a plain `nn.Linear`.
        """
        set_recomputation(self, bool(getattr(ipu_config, "recompute_checkpoint_every_layer", False)))
        owner, attribute = self.vocab_projection_site()
        set_projection_chunks(owner, attribute, num_projection_chunks(ipu_config))
        return self

    def deparallelize(self) -> Self:
        """Undo `parallelize`: no recomputation and a plain `nn.Linear` projection on the same weights."""
        set_recomputation(self, False)
        owner, attribute = self.vocab_projection_site()
        set_projection_chunks(owner, attribute, 1)
        return self
