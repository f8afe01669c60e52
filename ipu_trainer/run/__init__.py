"""One run resolved before any weights load: the arguments, the effective IPU config, the batch placement
over processes and the precision.
"""
