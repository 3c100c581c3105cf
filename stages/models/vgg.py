"""VGG networks for 3x32x32 images (CIFAR-10), as one flat ``nn.Sequential``.

The convolutional part follows the layer tables of Simonyan and Zisserman,
"Very Deep Convolutional Networks for Large-Scale Image Recognition" (2015),
as torchvision ships them (``torchvision.models.vgg.cfgs``, configurations
A, B, D and E for VGG-11, -13, -16 and -19). The ImageNet head (adaptive
pooling, two 4096-wide layers with dropout) is replaced by the usual 32x32
head: five 2x2 max-pools bring a 32x32 input down to a 512x1x1 map, which is
flattened and fed to a single linear layer. The head has no dropout, so a
model in eval mode computes the same output whether it runs whole or split
across stages.

Every layer sits directly in the returned ``nn.Sequential`` (nothing is
nested), so :func:`stages.models.partition.partition` can cut it at any
layer index.

Stage processes build their model by name through :func:`build_model`;
:data:`MODELS` lists the names it accepts.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from sparse_zmq.errors import ConfigError

__all__ = ["MODELS", "build_model", "cifar_vgg"]

logger = logging.getLogger(__name__)

# Our names for torchvision's configuration keys (Simonyan and Zisserman,
# Table 1: A = 11 weight layers, B = 13, D = 16, E = 19).
_CONFIG_KEYS: dict[str, str] = {
    "vgg11": "A",
    "vgg13": "B",
    "vgg16": "D",
    "vgg19": "E",
}

# Suffix of a model name that turns batch normalisation off.
_NO_BN_SUFFIX = "-nobn"

MODELS: tuple[str, ...] = tuple(_CONFIG_KEYS) + tuple(
    name + _NO_BN_SUFFIX for name in _CONFIG_KEYS
)
"""Every name :func:`build_model` accepts."""

# Channels of the last convolution, and spatial size left after the five
# max-pools of every configuration (32 / 2**5).
_FEATURE_CHANNELS = 512
_INPUT_CHANNELS = 3


def _layer_table(config: str) -> list[int | str]:
    """Return torchvision's layer table for one of our configuration names.

    torchvision is imported here rather than at module level: it adds seconds
    to the start of every process that imports this package, and only model
    construction needs it.
    """
    from torchvision.models.vgg import cfgs

    return list(cfgs[_CONFIG_KEYS[config]])


def cifar_vgg(
    config: str = "vgg11", *, batch_norm: bool = True, num_classes: int = 10
) -> nn.Sequential:
    """Build a VGG network for 3x32x32 inputs as one flat ``nn.Sequential``.

    Each convolution is 3x3 with padding 1, followed by batch normalisation
    (when ``batch_norm`` is true) and a ReLU; each ``"M"`` of the table is a
    2x2 max-pool. The head is ``nn.Flatten()`` then ``nn.Linear(512,
    num_classes)``.

    ReLUs are not in-place: a partition may begin with a ReLU, and an
    in-place ReLU would overwrite the activation a stage received (a leaf that
    requires grad during training), which autograd refuses.

    Parameters are initialised by PyTorch's defaults from the global random
    generator; seed it (or use :func:`build_model` with ``seed``) for a
    reproducible model.

    Args:
        config: One of ``"vgg11"``, ``"vgg13"``, ``"vgg16"``, ``"vgg19"``.
        batch_norm: Put a ``BatchNorm2d`` after every convolution.
        num_classes: Width of the output layer.

    Returns:
        The network; its output for an ``(N, 3, 32, 32)`` batch has shape
        ``(N, num_classes)``.

    Raises:
        ConfigError: ``config`` is not a known configuration, or
            ``num_classes`` is not a positive integer.
    """
    if config not in _CONFIG_KEYS:
        raise ConfigError(
            f"unknown VGG configuration {config!r}; allowed: {', '.join(_CONFIG_KEYS)}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ConfigError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")

    layers: list[nn.Module] = []
    channels = _INPUT_CHANNELS
    for entry in _layer_table(config):
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        width = int(entry)
        layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU())
        channels = width

    layers.append(nn.Flatten())
    layers.append(nn.Linear(_FEATURE_CHANNELS, num_classes))
    return nn.Sequential(*layers)


def build_model(name: str, **kw: Any) -> nn.Sequential:
    """Build a model from its name, as a stage process does from its options.

    ``"vgg16"`` is VGG-16 with batch normalisation, ``"vgg16-nobn"`` the same
    without it. Keyword arguments go to :func:`cifar_vgg`, apart from
    ``seed``.

    Args:
        name: One of :data:`MODELS`.
        **kw: ``num_classes`` (and ``batch_norm``, which must agree with the
            name) for :func:`cifar_vgg`; ``seed`` (int) to initialise the
            parameters from ``torch.manual_seed(seed)`` without disturbing the
            caller's global random state. Every stage that builds the same
            name with the same seed holds the same parameters, so its
            partition is exactly the matching part of the unsplit model.

    Returns:
        The flat ``nn.Sequential``.

    Raises:
        ConfigError: The name is not one of :data:`MODELS`, ``batch_norm``
            contradicts the name, ``seed`` is not an int, another option is
            unknown, or :func:`cifar_vgg` refuses ``num_classes``.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    config = name.removesuffix(_NO_BN_SUFFIX)
    batch_norm = not name.endswith(_NO_BN_SUFFIX)
    if "batch_norm" in kw and kw.pop("batch_norm") is not batch_norm:
        raise ConfigError(
            f"batch_norm contradicts model name {name!r}; choose batch norm "
            f"through the name ({config!r} or {config + _NO_BN_SUFFIX!r})"
        )
    seed = kw.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed must be an int or None, got {seed!r}")
    unknown = sorted(set(kw) - {"num_classes"})
    if unknown:
        raise ConfigError(
            f"unknown model option(s) {', '.join(unknown)}; "
            "allowed: num_classes, batch_norm, seed"
        )

    logger.debug("building model %s (seed %s, options %s)", name, seed, kw)
    if seed is None:
        return cifar_vgg(config, batch_norm=batch_norm, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cifar_vgg(config, batch_norm=batch_norm, **kw)
