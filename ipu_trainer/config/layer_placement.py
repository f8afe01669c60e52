"""Which pipeline stage each layer of a model is on, per an IPU config, and splitting a pipeline in two.

These are the placement helpers of optimum-graphcore's `modeling_utils` that need no IPU: code written
for it calls them to inspect or split `layers_per_ipu`. They read the config in its current mode
(`ipu_config.eval()` gives the inference placement). Here a device holds a whole replica, so the
placement is only checked and reported, unless `--pipeline` places the stages on processes
(`ipu_trainer.models.stages`); the wildcard arithmetic is `IPUConfig.resolved_layers_per_ipu`.
"""

from __future__ import annotations

import copy
from collections.abc import Sized

from .ipu_config import IncompatibleIPUConfigError, IPUConfig


def expand_layers_per_ipu(ipu_config: IPUConfig, target_number_of_layers: int | Sized | None = None) -> list[int]:
    """`layers_per_ipu` of the current mode with its -1 wildcards expanded for `target_number_of_layers`
    (a count, or a sequence of layers); without a target, the list as it is."""
    if target_number_of_layers is None:
        return list(ipu_config._layers_per_ipu)
    if not isinstance(target_number_of_layers, int):
        target_number_of_layers = len(target_number_of_layers)
    return ipu_config.resolved_layers_per_ipu(target_number_of_layers, for_inference=ipu_config.mode == "inference")


def get_layer_ipu(ipu_config: IPUConfig, target_number_of_layers: int | Sized | None = None) -> list[int]:
    """The pipeline stage (IPU index) of each layer, in layer order: [1, 2] gives [0, 1, 1]."""
    layer_ipu: list[int] = []
    for ipu, num_layers in enumerate(expand_layers_per_ipu(ipu_config, target_number_of_layers)):
        layer_ipu += [ipu] * num_layers
    return layer_ipu


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def split_encoder_decoder_ipu_config(
    ipu_config: IPUConfig, num_encoder_layers: int, num_decoder_layers: int
) -> tuple[IPUConfig, IPUConfig]:
    """Split the pipeline of an encoder-decoder model into an encoder config and a decoder config.

    The expanded `layers_per_ipu` (current mode) is cut after the IPUs holding exactly the encoder's layers;
    where several cuts qualify (IPUs without layers at the boundary), the largest one that leaves the encoder a
    power-of-two number of IPUs is taken, as the original did. Each half gets its part of `layers_per_ipu`, a
    per-IPU `matmul_proportion` list and `ipus_per_replica`. Serialized embedding splits must lie on the
    encoder's IPUs and serialized projection splits on the decoder's.
    """
    layers_name = ipu_config._get_managed_attr_mode_name("layers_per_ipu")
    ipus_name = ipu_config._get_managed_attr_mode_name("ipus_per_replica")
    if ipu_config._ipus_per_replica < 2:
        raise IncompatibleIPUConfigError(
            f"Need {ipus_name} to be at least 2 to split ipu_config into encoder and decoder configs "
            f"({ipus_name}={ipu_config._ipus_per_replica})"
        )
    layers = expand_layers_per_ipu(ipu_config, num_encoder_layers + num_decoder_layers)
    totals = [sum(layers[: i + 1]) for i in range(len(layers))]
    cuts = [i + 1 for i, total in enumerate(totals) if total == num_encoder_layers and _is_power_of_two(i + 1)]
    if not cuts:
        raise IncompatibleIPUConfigError(
            f"Unable to find a valid split of ipu_config.{layers_name}={ipu_config._layers_per_ipu} into "
            f"num_encoder_layers={num_encoder_layers} and num_decoder_layers={num_decoder_layers}: encoder and "
            "decoder layers cannot share an IPU, and the encoder needs a power-of-two number of IPUs"
        )
    cut = max(cuts)
    encoder, decoder = copy.deepcopy(ipu_config), copy.deepcopy(ipu_config)
    encoder._layers_per_ipu, decoder._layers_per_ipu = layers[:cut], layers[cut:]

    embedding_splits = ipu_config._serialized_embedding_splits_per_ipu
    if embedding_splits is not None:
        if sum(embedding_splits[cut:]):
            name = ipu_config._get_managed_attr_mode_name("serialized_embedding_splits_per_ipu")
            raise IncompatibleIPUConfigError(
                f"The `SerializedEmbedding` must have all splits placed on the encoder, but {name}={embedding_splits} "
                f"places {embedding_splits[cut:]} on the decoder"
            )
        encoder._serialized_embedding_splits_per_ipu = embedding_splits[:cut]
        decoder._serialized_embedding_splits_per_ipu = None
    projection_splits = ipu_config._serialized_projection_splits_per_ipu
    if projection_splits is not None:
        if sum(projection_splits[:cut]):
            name = ipu_config._get_managed_attr_mode_name("serialized_projection_splits_per_ipu")
            raise IncompatibleIPUConfigError(
                f"The `SplitProjection` must have all splits placed on the decoder, but {name}={projection_splits} "
                f"places {projection_splits[:cut]} on the encoder"
            )
        encoder._serialized_projection_splits_per_ipu = None
        decoder._serialized_projection_splits_per_ipu = projection_splits[cut:]

    encoder._ipus_per_replica, decoder._ipus_per_replica = cut, len(layers) - cut
    proportion = ipu_config._matmul_proportion
    if isinstance(proportion, list) and len(proportion) == len(layers):
        encoder._matmul_proportion, decoder._matmul_proportion = proportion[:cut], proportion[cut:]
    return encoder, decoder
