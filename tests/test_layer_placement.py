"""config.layer_placement: the pipeline stage of each layer and the encoder/decoder split, read from the IPU config's
current mode."""

import pytest

from ipu_trainer.config.ipu_config import IncompatibleIPUConfigError, IPUConfig
from ipu_trainer.config.layer_placement import expand_layers_per_ipu, get_layer_ipu, split_encoder_decoder_ipu_config


def test_the_per_ipu_layer_counts_expand_wildcards_for_the_models_layers():
    config = IPUConfig(layers_per_ipu=[1, -1, -1, -1])
    assert expand_layers_per_ipu(config) == [1, -1, -1, -1]  # no model: the list as it is
    assert expand_layers_per_ipu(config, 12) == [1, 3, 3, 5]  # the rest shared, the remainder on the last -1
    assert expand_layers_per_ipu(config, list(range(12))) == [1, 3, 3, 5]  # a sequence of layers counts its length
    assert expand_layers_per_ipu(IPUConfig(layers_per_ipu=[-1], ipus_per_replica=4), 10) == [2, 2, 2, 4]
    with pytest.raises(IncompatibleIPUConfigError, match="layers_per_ipu"):
        expand_layers_per_ipu(IPUConfig(layers_per_ipu=[2, 2]), 5)


def test_each_layer_is_on_the_ipu_of_its_split_in_the_current_mode():
    config = IPUConfig(layers_per_ipu=[0, 2, 2], inference_layers_per_ipu=[4], inference_ipus_per_replica=1)
    assert get_layer_ipu(config, 4) == [1, 1, 2, 2]  # no layer on the first IPU (the embeddings')
    assert get_layer_ipu(config.eval(), 4) == [0, 0, 0, 0]
    assert get_layer_ipu(config.train(), 4) == [1, 1, 2, 2]


def test_the_encoder_decoder_split_gives_each_half_its_ipus_and_leaves_the_config_alone():
    config = IPUConfig(layers_per_ipu=[2, 2, 3, 3], matmul_proportion=[0.1, 0.2, 0.3, 0.4],
                       serialized_embedding_splits_per_ipu=[1, 1, 0, 0])
    encoder, decoder = split_encoder_decoder_ipu_config(config, 4, 6)
    assert (encoder.layers_per_ipu, encoder.ipus_per_replica, encoder.matmul_proportion) == ([2, 2], 2, [0.1, 0.2])
    assert (decoder.layers_per_ipu, decoder.ipus_per_replica, decoder.matmul_proportion) == ([3, 3], 2, [0.3, 0.4])
    assert (encoder.serialized_embedding_splits_per_ipu, decoder.serialized_embedding_splits_per_ipu) == ([1, 1], None)
    assert config.layers_per_ipu == [2, 2, 3, 3] and config.ipus_per_replica == 4
    # The encoder must end on an IPU boundary, on a power-of-two number of IPUs.
    with pytest.raises(IncompatibleIPUConfigError, match="Unable to find a valid split"):
        split_encoder_decoder_ipu_config(IPUConfig(layers_per_ipu=[1, 1, 1, 1]), 3, 1)
