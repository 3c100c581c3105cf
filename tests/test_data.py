"""Tests for stages.data: the digits and CIFAR-10 loaders and batching."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_zmq.errors import ConfigError, DataError
from stages.data import (
    CIFAR10_MEAN,
    CIFAR10_RECORD_BYTES,
    CIFAR10_STD,
    Dataset,
    batches,
    load_cifar10,
    load_dataset,
    load_digits,
)

DIGITS_TOTAL = 1797
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]


def _rows(dataset: Dataset) -> set[bytes]:
    """Each image's bytes, to compare data sets image by image."""
    return {image.numpy().tobytes() for image in dataset.images}


def _write_cifar_file(
    path: Path, labels: list[int], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Write records in the official binary layout; return pixels and labels."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    label_bytes = np.asarray(labels, dtype=np.uint8)
    records = np.concatenate(
        [label_bytes[:, None], pixels.reshape(len(labels), -1)], axis=1
    )
    assert records.shape[1] == CIFAR10_RECORD_BYTES
    path.write_bytes(records.tobytes())
    return pixels, label_bytes.astype(np.int64)


def _write_cifar_train(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write the five training files with 5, 3, 4, 1 and 2 records."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = [
        _write_cifar_file(folder / name, [(i + j) % 10 for j in range(count)], i)
        for i, (name, count) in enumerate(
            zip(TRAIN_FILES, [5, 3, 4, 1, 2], strict=True)
        )
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _denormalise(images: torch.Tensor) -> np.ndarray:
    """Undo the CIFAR-10 normalisation back to uint8 pixels."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images * std + mean).mul(255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def digits_train() -> Dataset:
    return load_digits(train=True)


@pytest.fixture(scope="module")
def digits_test() -> Dataset:
    return load_digits(train=False)


def test_digits_are_normalised_3x32x32_float_images_with_int64_labels(
    digits_train: Dataset, digits_test: Dataset
) -> None:
    for dataset in (digits_train, digits_test):
        assert dataset.images.dtype == torch.float32
        assert dataset.images.shape[1:] == (3, 32, 32)
        assert dataset.labels.dtype == torch.int64
        assert dataset.labels.shape == (len(dataset),)
        assert torch.equal(dataset.images[:, 0], dataset.images[:, 1])
        assert torch.equal(dataset.images[:, 0], dataset.images[:, 2])

    mean = digits_train.images.mean(dim=(0, 2, 3))
    std = digits_train.images.std(dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, torch.ones(3), atol=1e-4, rtol=0)
    assert digits_train.name == "digits-train"
    assert digits_test.name == "digits-test"


def test_digits_split_is_disjoint_covers_everything_and_keeps_every_class(
    digits_train: Dataset, digits_test: Dataset
) -> None:
    assert len(digits_train) + len(digits_test) == DIGITS_TOTAL
    assert len(digits_test) == pytest.approx(0.2 * DIGITS_TOTAL, abs=1)

    train_rows, test_rows = _rows(digits_train), _rows(digits_test)
    assert len(train_rows) == len(digits_train)
    assert len(test_rows) == len(digits_test)
    assert not train_rows & test_rows

    for dataset in (digits_train, digits_test):
        assert torch.unique(dataset.labels).tolist() == list(range(10))


def test_digits_split_is_the_same_for_the_same_seed(digits_test: Dataset) -> None:
    again = load_digits(train=False, seed=0)
    assert torch.equal(again.images, digits_test.images)
    assert torch.equal(again.labels, digits_test.labels)

    other = load_digits(train=False, seed=1)
    assert not torch.equal(other.labels, digits_test.labels) or not torch.equal(
        other.images, digits_test.images
    )


def test_digits_test_fraction_sets_the_held_out_size() -> None:
    held_out = load_digits(train=False, test_fraction=0.5)
    assert len(held_out) == pytest.approx(DIGITS_TOTAL / 2, abs=1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, 0.001, "0.2", True])
def test_digits_rejects_unusable_test_fractions(fraction: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_digits(train=True, test_fraction=fraction)  # type: ignore[arg-type]
    assert repr(fraction) in str(info.value)


def test_load_dataset_without_a_folder_uses_digits_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="stages.data"):
        dataset = load_dataset(None, train=False)
    assert dataset.name == "digits-test"
    assert any(
        record.levelno == logging.INFO and "--data" in record.getMessage()
        for record in caplog.records
    )


def test_batches_without_shuffle_keep_order_and_drop_the_short_tail(
    digits_test: Dataset,
) -> None:
    got = list(batches(digits_test, 100, shuffle=False, seed=0))
    assert len(got) == len(digits_test) // 100
    assert all(images.shape == (100, 3, 32, 32) for images, _ in got)
    assert torch.equal(got[1][0], digits_test.images[100:200])
    assert torch.equal(got[1][1], digits_test.labels[100:200])


def test_batches_keep_the_short_tail_when_asked(digits_test: Dataset) -> None:
    got = list(batches(digits_test, 100, shuffle=False, seed=0, drop_last=False))
    assert sum(len(labels) for _, labels in got) == len(digits_test)
    assert len(got[-1][1]) == len(digits_test) % 100


def test_shuffled_batches_visit_each_image_once_in_a_seeded_order(
    digits_test: Dataset,
) -> None:
    first = list(batches(digits_test, 7, shuffle=True, seed=5, drop_last=False))
    again = list(batches(digits_test, 7, shuffle=True, seed=5, drop_last=False))
    other = list(batches(digits_test, 7, shuffle=True, seed=6, drop_last=False))

    seen = torch.cat([images for images, _ in first])
    assert _rows(Dataset(seen, torch.cat([y for _, y in first]), "seen")) == _rows(
        digits_test
    )
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(first, again, strict=True)
    )
    assert not torch.equal(first[0][0], other[0][0])
    assert not torch.equal(first[0][0], digits_test.images[:7])


def test_batches_larger_than_the_data_set_yield_nothing_with_drop_last(
    digits_test: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="stages.data"):
        assert list(batches(digits_test, 10_000, shuffle=False, seed=0)) == []
    assert "10000" in caplog.text


@pytest.mark.parametrize("size", [0, -1, 2.0, True])
def test_batches_reject_bad_batch_sizes(digits_test: Dataset, size: object) -> None:
    with pytest.raises(ConfigError) as info:
        batches(digits_test, size, shuffle=False, seed=0)  # type: ignore[arg-type]
    assert repr(size) in str(info.value)


def test_dataset_refuses_images_of_the_wrong_shape() -> None:
    with pytest.raises(DataError, match=r"\(2, 1, 32, 32\)"):
        Dataset(torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.int64), "bad")
    with pytest.raises(DataError, match="labels"):
        Dataset(torch.zeros(2, 3, 32, 32), torch.zeros(3, dtype=torch.int64), "bad")


@pytest.mark.parametrize("subfolder", ["", "cifar-10-batches-bin"])
def test_cifar_binary_training_files_load_with_exact_pixels_and_labels(
    tmp_path: Path, subfolder: str
) -> None:
    pixels, labels = _write_cifar_train(tmp_path / subfolder)
    dataset = load_cifar10(tmp_path, train=True)

    assert dataset.name == "cifar10-train"
    assert dataset.images.dtype == torch.float32
    assert dataset.images.shape == (15, 3, 32, 32)
    assert torch.equal(dataset.labels, torch.from_numpy(labels))
    np.testing.assert_array_equal(_denormalise(dataset.images), pixels)


def test_cifar_binary_normalises_each_channel_with_the_cifar_statistics(
    tmp_path: Path,
) -> None:
    pixels, _ = _write_cifar_file(tmp_path / "test_batch.bin", [3, 1], seed=9)
    dataset = load_cifar10(tmp_path, train=False)

    # Record 1, green channel, row 4, column 7.
    raw = int(pixels[1, 1, 4, 7])
    expected = (raw / 255 - CIFAR10_MEAN[1]) / CIFAR10_STD[1]
    assert dataset.images[1, 1, 4, 7].item() == pytest.approx(expected, abs=1e-5)
    assert dataset.labels.tolist() == [3, 1]
    assert dataset.name == "cifar10-test"


def test_load_dataset_with_a_folder_reads_cifar(tmp_path: Path) -> None:
    _write_cifar_file(tmp_path / "test_batch.bin", [0, 9, 4], seed=2)
    assert load_dataset(tmp_path, train=False).labels.tolist() == [0, 9, 4]


def test_missing_cifar_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataError) as info:
        load_cifar10(missing, train=True)
    assert str(missing) in str(info.value)
    assert "data_batch_1.bin" in str(info.value)


def test_incomplete_cifar_folder_says_what_was_looked_for_and_where(
    tmp_path: Path,
) -> None:
    _write_cifar_train(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path, train=True)
    message = str(info.value)
    assert f"in {tmp_path}: missing data_batch_3.bin" in message
    assert str(tmp_path / "cifar-10-batches-bin") in message
    assert str(CIFAR10_RECORD_BYTES) in message
    assert "data_batch_5.bin" in message


def test_cifar_file_of_the_wrong_size_is_a_data_error(tmp_path: Path) -> None:
    _write_cifar_file(tmp_path / "test_batch.bin", [1, 2], seed=0)
    with (tmp_path / "test_batch.bin").open("ab") as extra:
        extra.write(b"\x00" * 10)
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path, train=False)
    message = str(info.value)
    assert "test_batch.bin" in message
    assert str(2 * CIFAR10_RECORD_BYTES + 10) in message
    assert str(CIFAR10_RECORD_BYTES) in message


def test_empty_cifar_file_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "test_batch.bin").write_bytes(b"")
    with pytest.raises(DataError, match="0 bytes"):
        load_cifar10(tmp_path, train=False)


def test_cifar_label_out_of_range_is_a_data_error(tmp_path: Path) -> None:
    _write_cifar_file(tmp_path / "test_batch.bin", [1, 10], seed=0)
    with pytest.raises(DataError, match="record 1 has label 10"):
        load_cifar10(tmp_path, train=False)


def test_unreadable_torchvision_layout_is_a_data_error(tmp_path: Path) -> None:
    # An empty cifar-10-batches-py folder fails torchvision's integrity check.
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path, train=False)
