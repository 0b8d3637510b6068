"""Train a MoGE (or top-K / group-limited baseline) language model on text, with resumable checkpoints.

``moge train --out DIR [--data PATH ...] [--preset NAME] [--router moge|topk|group_limited]``; under
``torchrun`` with ``--ep E`` the routed experts are sharded over E ranks. The training job itself
(options, setup, loop, checkpoints) is :mod:`moge.train`; see docs/training.md.
"""

from ..train import add_arguments, run


__all__ = ["add_arguments", "run"]
