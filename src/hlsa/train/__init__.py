"""Training: the LTE sparsity controller, data streams and synthetic tasks, checkpoints, and the loop.

Nothing is imported here so that `hlsa --help` stays light; use `hlsa.train.trainer.Trainer` or `hlsa train`.
"""
