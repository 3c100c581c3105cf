"""Cutting a flat ``nn.Sequential`` into partitions, one per stage.

A split point is a layer index ``p``: layers ``[..., p-1]`` go to one
partition and layers ``[p, ...]`` to the next. ``n`` strictly increasing
split points ``0 < p1 < ... < pn < len(model)`` give ``n + 1`` partitions,
each non-empty. Partitions hold the model's own layer objects (nothing is
copied) and keep the layer names of the unsplit model, so partition
``state_dict`` keys match the unsplit model's keys.

On the command line split points are written ``"4"`` or ``"4,8"``
(:func:`parse_split`); :func:`default_split` picks points when none are
given.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from torch import nn

from sparse_zmq.errors import ConfigError

__all__ = ["default_split", "parse_split", "partition"]

logger = logging.getLogger(__name__)


def _check_points(split_points: Sequence[int], n_layers: int) -> list[int]:
    """Return the split points as a list, or raise ConfigError naming them."""
    points = list(split_points)
    allowed = (
        f"allowed: strictly increasing integers in 1..{n_layers - 1} "
        f"for a model of {n_layers} layers"
    )
    for point in points:
        if isinstance(point, bool) or not isinstance(point, int):
            raise ConfigError(f"split point {point!r} is not an integer; {allowed}")
        if not 0 < point < n_layers:
            raise ConfigError(f"split points {points}: {point} out of range; {allowed}")
    for before, after in itertools.pairwise(points):
        if after <= before:
            raise ConfigError(
                f"split points {points}: {after} does not follow {before}; {allowed}"
            )
    return points


def partition(model: nn.Sequential, split_points: Sequence[int]) -> list[nn.Sequential]:
    """Split a flat sequential model at the given layer indices.

    Args:
        model: The whole network as one ``nn.Sequential``.
        split_points: Strictly increasing layer indices, each in
            ``1 .. len(model) - 1``. An empty sequence gives one partition
            holding every layer.

    Returns:
        ``len(split_points) + 1`` sequential partitions. They share their
        modules (and so their parameters and buffers) with ``model``: running
        them one after the other computes what ``model`` computes.

    Raises:
        ConfigError: ``model`` is not an ``nn.Sequential`` or a split point is
            not an integer, is out of range or out of order.
    """
    if not isinstance(model, nn.Sequential):
        raise ConfigError(
            f"only nn.Sequential models can be partitioned, got {type(model).__name__}"
        )
    points = _check_points(split_points, len(model))

    # Slicing an nn.Sequential keeps the original module names and objects.
    bounds = [0, *points, len(model)]
    parts = [model[start:stop] for start, stop in itertools.pairwise(bounds)]
    logger.debug(
        "partitioned %d layers at %s into sizes %s",
        len(model),
        points,
        [len(part) for part in parts],
    )
    return parts


def parse_split(text: str) -> list[int]:
    """Parse split points written as on the command line.

    Only the syntax is checked here; :func:`partition` checks the points
    against the model.

    Args:
        text: Comma-separated layer indices, e.g. ``"4"`` or ``"4, 8"``.

    Returns:
        The indices in the order written.

    Raises:
        ConfigError: The text is empty or an item is not a decimal integer.
    """
    if not text.strip():
        raise ConfigError(
            f"split points {text!r} are empty; expected layer indices such as "
            "'4' or '4,8'"
        )
    points: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        try:
            points.append(int(item))
        except ValueError as exc:
            raise ConfigError(
                f"split points {text!r}: {item!r} is not an integer; expected "
                "comma-separated layer indices such as '4' or '4,8'"
            ) from exc
    return points


def default_split(model: nn.Sequential, n_partitions: int) -> list[int]:
    """Choose split points that cut a model into roughly equal partitions.

    Targets are evenly spaced layer indices (``k * len(model) / n`` for
    ``k = 1 .. n - 1``). Each target moves to the nearest index just after a
    ``MaxPool2d``, where the activation sent between stages is smallest. When
    the model has too few pooling layers for that, every layer boundary is a
    candidate instead.

    Args:
        model: The whole network as one ``nn.Sequential``.
        n_partitions: How many partitions to make, ``1 .. len(model)``.

    Returns:
        ``n_partitions - 1`` split points accepted by :func:`partition`.

    Raises:
        ConfigError: ``n_partitions`` is not an integer in ``1 .. len(model)``.
    """
    n_layers = len(model)
    if (
        isinstance(n_partitions, bool)
        or not isinstance(n_partitions, int)
        or not 1 <= n_partitions <= n_layers
    ):
        raise ConfigError(
            f"cannot cut a model of {n_layers} layers into {n_partitions!r} "
            f"partitions; allowed: 1..{n_layers}"
        )
    wanted = n_partitions - 1

    after_pool = [
        index + 1
        for index, layer in enumerate(model)
        if isinstance(layer, nn.MaxPool2d) and index + 1 < n_layers
    ]
    candidates = after_pool if len(after_pool) >= wanted else list(range(1, n_layers))

    # Greedy, left to right: the nearest candidate to each target that still
    # leaves one candidate for every split point yet to be placed.
    points: list[int] = []
    lowest = 0
    for k in range(1, wanted + 1):
        target = k * n_layers / n_partitions
        highest = len(candidates) - (wanted - k) - 1
        _, best = min(
            (abs(candidates[i] - target), i) for i in range(lowest, highest + 1)
        )
        points.append(candidates[best])
        lowest = best + 1
    logger.debug(
        "default split of %d layers into %d partitions: %s",
        n_layers,
        n_partitions,
        points,
    )
    return points
