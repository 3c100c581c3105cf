"""Data sets a source feeds into the pipeline, as normalised 3x32x32 images.

Two sources are supported, and neither is ever downloaded:

* **CIFAR-10** from a folder the user provides (``--data``), in the official
  binary layout (read here with numpy) or in torchvision's Python layout;
* scikit-learn's bundled **digits** (1,797 real 8x8 handwritten digits),
  scaled up to 32x32 and repeated to three channels, used when no folder is
  given so that every run has real images to learn from.

Both come back as a :class:`Dataset` held entirely in memory as float32
tensors; the CIFAR-10 training set takes about 600 MiB that way.
:func:`batches` cuts a data set into mini-batches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparse_zmq.errors import ConfigError, DataError

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_RECORD_BYTES",
    "CIFAR10_STD",
    "Dataset",
    "batches",
    "load_cifar10",
    "load_dataset",
    "load_digits",
]

logger = logging.getLogger(__name__)

IMAGE_SHAPE = (3, 32, 32)

# Per-channel (R, G, B) mean and standard deviation of the 50,000 CIFAR-10
# training images, pixel values scaled to [0, 1]. Fixed constants rather than
# statistics of the loaded files, so train and test sets (and a partial copy
# of either) are normalised identically.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Binary layout from https://www.cs.toronto.edu/~kriz/cifar.html: each record
# is one label byte (0-9) followed by 3072 pixel bytes, the 1024 red, then
# 1024 green, then 1024 blue values of a 32x32 image in row-major order.
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch.bin",)
CIFAR10_CLASSES = 10
_BIN_FOLDER = "cifar-10-batches-bin"
_PY_FOLDER = "cifar-10-batches-py"

# Digit images hold integers 0..16 (scikit-learn's load_digits description).
_DIGITS_MAX = 16.0
_DIGITS_CLASSES = 10


@dataclass(frozen=True)
class Dataset:
    """A labelled image set held in memory.

    Attributes:
        images: float32 tensor of shape ``(N, 3, 32, 32)``, normalised per
            channel.
        labels: int64 tensor of shape ``(N,)``, class indices.
        name: A short name for logs and records, such as ``"digits-train"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str

    def __post_init__(self) -> None:
        """Check shapes and dtypes so a malformed set fails where it is made."""
        image_shape = tuple(self.images.shape)
        if self.images.dtype != torch.float32 or image_shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"{self.name}: images are {self.images.dtype} of shape "
                f"{image_shape}; expected torch.float32 of shape "
                f"(N, {', '.join(map(str, IMAGE_SHAPE))})"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (
            self.images.shape[0],
        ):
            raise DataError(
                f"{self.name}: labels are {self.labels.dtype} of shape "
                f"{tuple(self.labels.shape)}; expected torch.int64 of shape "
                f"({self.images.shape[0]},)"
            )

    def __len__(self) -> int:
        """Return the number of images."""
        return int(self.labels.shape[0])


def batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a data set into ``(images, labels)`` mini-batches, one epoch.

    Args:
        dataset: The data set to read.
        batch_size: Images per batch, at least 1.
        shuffle: Visit the images in a random order drawn from ``seed``
            (the same seed gives the same order); otherwise in stored order.
        seed: Seed of the shuffle; unused when ``shuffle`` is false.
        drop_last: Leave out a last batch smaller than ``batch_size``. With
            ``drop_last`` and fewer images than ``batch_size`` nothing is
            yielded (a warning is logged).

    Returns:
        An iterator of ``images`` of shape ``(B, 3, 32, 32)`` and ``labels``
        of shape ``(B,)``. Without shuffling these are views of the data
        set's own tensors: do not modify them in place.

    Raises:
        ConfigError: ``batch_size`` is not a positive integer (raised at the
            call, before any batch is drawn).
    """
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")

    total = len(dataset)
    if drop_last and total < batch_size:
        logger.warning(
            "%s: %d images do not fill one batch of %d; no batches with drop_last",
            dataset.name,
            total,
            batch_size,
        )
    order = None
    if shuffle:
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    stop = total - total % batch_size if drop_last else total
    return _batch_iterator(dataset, batch_size, stop, order)


def _batch_iterator(
    dataset: Dataset, batch_size: int, stop: int, order: torch.Tensor | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield the batches :func:`batches` describes, up to image ``stop``."""
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, len(dataset))
        if order is None:
            yield dataset.images[start:end], dataset.labels[start:end]
        else:
            index = order[start:end]
            yield dataset.images[index], dataset.labels[index]


def _normalise(
    pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Scale ``(N, 3, H, W)`` values in [0, 1] by per-channel mean and std."""
    return (pixels - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _from_uint8(pixels: np.ndarray, labels: np.ndarray, name: str) -> Dataset:
    """Build a CIFAR-10 :class:`Dataset` from uint8 NCHW pixels and labels."""
    scaled = torch.from_numpy(pixels).to(torch.float32).div_(255.0)
    images = _normalise(
        scaled, torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    ).contiguous()
    return Dataset(images, torch.from_numpy(labels.astype(np.int64)), name)


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary file into uint8 pixels (N, 3, 32, 32) and labels."""
    try:
        records = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read CIFAR-10 file {path}: {exc}") from exc
    size = records.size
    if size == 0 or size % CIFAR10_RECORD_BYTES:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of CIFAR-10 records "
            f"of {CIFAR10_RECORD_BYTES} bytes (1 label byte + 3072 pixel bytes)"
        )
    records = records.reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0]
    bad = np.flatnonzero(labels >= CIFAR10_CLASSES)
    if bad.size:
        raise DataError(
            f"{path}: record {int(bad[0])} has label {int(labels[bad[0]])}; "
            f"CIFAR-10 labels are 0..{CIFAR10_CLASSES - 1}"
        )
    pixels = records[:, 1:].reshape(-1, *IMAGE_SHAPE)
    return pixels, labels


def _load_torchvision_layout(root: Path, *, train: bool, name: str) -> Dataset:
    """Load CIFAR-10 through torchvision from a ``cifar-10-batches-py`` layout."""
    from torchvision.datasets import CIFAR10

    try:
        source = CIFAR10(str(root), train=train, download=False)
    except (RuntimeError, OSError, ValueError) as exc:
        raise DataError(
            f"torchvision could not read CIFAR-10 from {root / _PY_FOLDER}: {exc}"
        ) from exc
    pixels = np.ascontiguousarray(np.asarray(source.data).transpose(0, 3, 1, 2))
    labels = np.asarray(source.targets, dtype=np.int64)
    return _from_uint8(pixels, labels, name)


def load_cifar10(root: str | os.PathLike[str], *, train: bool) -> Dataset:
    """Load CIFAR-10 from a folder on disk; nothing is ever downloaded.

    The official binary layout is looked for first, in ``root`` and in
    ``root/cifar-10-batches-bin``: ``data_batch_1.bin`` .. ``data_batch_5.bin``
    for the training set, ``test_batch.bin`` for the test set. Each file must
    hold a whole number of 3073-byte records (the official files hold 10,000
    each; smaller files are accepted). These files are read with numpy only.

    Failing that, a ``root/cifar-10-batches-py`` folder (or ``root`` itself
    when it is that folder) is handed to ``torchvision.datasets.CIFAR10``,
    which checks the files' MD5 sums and then **unpickles** them: use it only
    on files you downloaded yourself from a source you trust.

    Pixels are scaled to [0, 1] and normalised with :data:`CIFAR10_MEAN` and
    :data:`CIFAR10_STD`.

    Args:
        root: The folder holding the data set.
        train: Load the 50,000 training images rather than the 10,000 test
            images.

    Returns:
        The data set, named ``"cifar10-train"`` or ``"cifar10-test"``.

    Raises:
        DataError: The folder does not exist, neither layout is complete, a
            file's size is not a whole number of records, a label is out of
            range, or torchvision refuses its files.
    """
    root = Path(root)
    name = "cifar10-train" if train else "cifar10-test"
    wanted = CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES
    if not root.is_dir():
        raise DataError(
            f"CIFAR-10 folder {root} does not exist or is not a folder; expected "
            f"{', '.join(wanted)} there or in {root / _BIN_FOLDER}"
        )

    # The official binary layout, unpacked in place or one folder down.
    searched = [root, root / _BIN_FOLDER]
    for folder in searched:
        paths = [folder / file for file in wanted]
        if all(path.is_file() for path in paths):
            logger.info("reading %s from binary files in %s", name, folder)
            parts = [_read_binary_batch(path) for path in paths]
            pixels = np.concatenate([part[0] for part in parts])
            labels = np.concatenate([part[1] for part in parts])
            dataset = _from_uint8(pixels, labels, name)
            logger.info("%s: %d images", name, len(dataset))
            return dataset

    # torchvision's pickled layout.
    if (root / _PY_FOLDER).is_dir():
        logger.info("reading %s through torchvision from %s", name, root / _PY_FOLDER)
        return _load_torchvision_layout(root, train=train, name=name)
    if root.name == _PY_FOLDER:
        logger.info("reading %s through torchvision from %s", name, root)
        return _load_torchvision_layout(root.parent, train=train, name=name)

    missing = "; ".join(
        f"in {folder}: missing "
        + ", ".join(file for file in wanted if not (folder / file).is_file())
        for folder in searched
    )
    raise DataError(
        f"no CIFAR-10 {'training' if train else 'test'} set found under {root}: "
        f"looked for {', '.join(wanted)} ({missing}), binary records of "
        f"{CIFAR10_RECORD_BYTES} bytes each, or a {_PY_FOLDER} folder for "
        "torchvision"
    )


def load_digits(*, train: bool, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Load scikit-learn's bundled handwritten digits as 3x32x32 images.

    The 1,797 8x8 images (values 0..16) ship with scikit-learn, so nothing is
    downloaded. They are scaled to [0, 1], enlarged to 32x32 by bilinear
    interpolation, repeated to three channels and normalised per channel with
    the mean and standard deviation of the training part. The split into
    training and held-out images is stratified by class and drawn from
    ``seed``: the same arguments always give the same split, and the two
    parts never share an image.

    Args:
        train: Return the training part rather than the held-out part.
        test_fraction: Share of the images held out, strictly between 0 and 1
            (and large enough for every class to appear in both parts).
        seed: Seed of the split.

    Returns:
        The data set, named ``"digits-train"`` or ``"digits-test"``.

    Raises:
        ConfigError: ``test_fraction`` is out of range or leaves a class out
            of one part.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float))
        or not 0.0 < test_fraction < 1.0
    ):
        raise ConfigError(
            f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}"
        )
    bunch = sklearn_digits()
    raw = np.asarray(bunch.images, dtype=np.float32)
    targets = np.asarray(bunch.target, dtype=np.int64)

    # Stratified so that both parts keep the class balance of the whole set.
    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(targets)),
            test_size=float(test_fraction),
            random_state=seed,
            stratify=targets,
        )
    except ValueError as exc:
        raise ConfigError(
            f"test_fraction {test_fraction!r} cannot split {len(targets)} digits "
            f"over {_DIGITS_CLASSES} classes: {exc}"
        ) from exc

    small = torch.from_numpy(raw).div_(_DIGITS_MAX).unsqueeze(1)
    large = torch.nn.functional.interpolate(
        small, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=False
    )
    images = large.repeat(1, IMAGE_SHAPE[0], 1, 1)

    # Statistics of the training part only, so held-out images stay unseen.
    fit = images[torch.from_numpy(train_idx)]
    mean = fit.mean(dim=(0, 2, 3))
    std = fit.std(dim=(0, 2, 3))

    chosen = torch.from_numpy(np.sort(train_idx if train else test_idx))
    name = "digits-train" if train else "digits-test"
    dataset = Dataset(
        _normalise(images[chosen], mean, std).contiguous(),
        torch.from_numpy(targets)[chosen],
        name,
    )
    logger.debug(
        "%s: %d images (seed %d, test_fraction %s)",
        name,
        len(dataset),
        seed,
        test_fraction,
    )
    return dataset


def load_dataset(data_dir: str | os.PathLike[str] | None, *, train: bool) -> Dataset:
    """Load the data set a run asked for.

    Args:
        data_dir: A CIFAR-10 folder (see :func:`load_cifar10`), or ``None``
            for the bundled digits (see :func:`load_digits`).
        train: Load the training part rather than the test part.

    Returns:
        The data set.

    Raises:
        DataError: ``data_dir`` does not hold CIFAR-10.
    """
    if data_dir is None:
        logger.info(
            "no --data given: using scikit-learn's bundled digits set "
            "(1,797 8x8 images scaled to 32x32) instead of CIFAR-10"
        )
        return load_digits(train=train)
    return load_cifar10(data_dir, train=train)
