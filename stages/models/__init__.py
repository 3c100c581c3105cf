"""Models a stage can hold, and how to cut them into partitions.

A model here is one flat :class:`torch.nn.Sequential`, so any layer index is a
place where the network can be split between two stages::

    from stages.models import build_model, default_split, partition

    model = build_model("vgg11", seed=0)
    first, second = partition(model, default_split(model, 2))
"""

from stages.models.partition import default_split, parse_split, partition
from stages.models.vgg import MODELS, build_model, cifar_vgg

__all__ = [
    "MODELS",
    "build_model",
    "cifar_vgg",
    "default_split",
    "parse_split",
    "partition",
]
