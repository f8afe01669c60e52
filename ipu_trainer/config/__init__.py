"""The IPU config file: `IPUConfig` (every field, its default and its meaning here) and the
placement of a model's layers that `layers_per_ipu` describes.
"""
