"""The local launcher refuses bad options before starting any process."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparse_zmq.errors import ConfigError
from sparse_zmq.launch import SUITES, RunOptions, load_suite, run_suite


@pytest.mark.parametrize("name", SUITES)
def test_every_suite_description_loads(name: str) -> None:
    suite = load_suite(name)
    assert suite["name"] == name and suite["stages"]


def test_unknown_suite_names_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="available: cloudlet"):
        load_suite("nosuch")


@pytest.mark.parametrize(
    ("suite", "split", "match"),
    [
        ("hybrid-off-device", "8,15", "gives 3 partitions, but suite 'hybrid-off-device' runs 2"),
        ("cloudlet", "8", "runs 1; give 0 split"),
        ("hybrid-on-device", "999", "999 out of range"),
    ],
)
def test_a_split_that_does_not_fit_the_suite_is_refused_before_start(
    tmp_path: Path, suite: str, split: str, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        run_suite(suite, tmp_path / "out", RunOptions(split=split))
    assert not (tmp_path / "out").exists()  # nothing was started


def test_a_missing_data_folder_is_refused_before_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a folder"):
        run_suite("cloudlet", tmp_path / "out", RunOptions(data=str(tmp_path / "nope")))


def test_a_new_run_replaces_the_outputs_of_an_earlier_run_in_the_same_folder(
    tmp_path: Path,
) -> None:
    from sparse_zmq.launch import RUN_OUTPUTS, _clear_previous_run

    for name in RUN_OUTPUTS:
        (tmp_path / name).write_text("old\n")
    (tmp_path / "notes.txt").write_text("mine\n")
    _clear_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
