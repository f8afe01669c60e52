"""The training loop's parts: `IPUTrainer`, the original's optimizers and schedules, where optimizer state
lives, checkpoints, stopping on signals, throughput, MFU and evaluation metrics.
"""
