"""Tests for stages.models: the CIFAR VGG family and partitioning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_zmq.errors import ConfigError
from stages.models import (
    MODELS,
    build_model,
    cifar_vgg,
    default_split,
    parse_split,
    partition,
)

CONFIGS = ["vgg11", "vgg13", "vgg16", "vgg19"]

# Convolutions per configuration (Simonyan and Zisserman, Table 1: weight
# layers minus the three fully connected ones of the ImageNet head).
CONVS = {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}


@pytest.fixture(scope="module")
def vgg11() -> nn.Sequential:
    """Build a seeded VGG-11 with batch norm, shared by the read-only tests."""
    return build_model("vgg11", seed=0).eval()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("batch_norm", [True, False])
def test_vgg_maps_a_32x32_batch_to_class_scores(config: str, batch_norm: bool) -> None:
    model = cifar_vgg(config, batch_norm=batch_norm).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_vgg_output_width_follows_num_classes() -> None:
    model = cifar_vgg("vgg11", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("config", CONFIGS)
def test_vgg_is_one_flat_sequential_of_leaf_layers(config: str) -> None:
    model = cifar_vgg(config)
    assert type(model) is nn.Sequential
    assert all(len(list(layer.children())) == 0 for layer in model)

    # conv + bn + relu per convolution, five pools, flatten and linear.
    assert len(model) == 3 * CONVS[config] + 5 + 2
    kinds = [type(layer) for layer in model]
    assert kinds.count(nn.MaxPool2d) == 5
    assert kinds[-2:] == [nn.Flatten, nn.Linear]


def test_vgg_without_batch_norm_has_no_batch_norm_layers() -> None:
    model = cifar_vgg("vgg16", batch_norm=False)
    assert not any(isinstance(layer, nn.BatchNorm2d) for layer in model)
    assert len(model) == 2 * CONVS["vgg16"] + 5 + 2


def test_vgg_has_no_dropout_or_in_place_relu() -> None:
    model = cifar_vgg("vgg19")
    assert not any(isinstance(layer, nn.Dropout) for layer in model)
    assert not any(isinstance(layer, nn.ReLU) and layer.inplace for layer in model)


def test_unknown_vgg_config_names_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as info:
        cifar_vgg("vgg12")
    message = str(info.value)
    assert "'vgg12'" in message
    for config in CONFIGS:
        assert config in message


def test_bad_num_classes_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="0"):
        cifar_vgg("vgg11", num_classes=0)


@pytest.mark.parametrize("name", MODELS)
def test_build_model_knows_every_listed_name(name: str) -> None:
    model = build_model(name)
    has_bn = any(isinstance(layer, nn.BatchNorm2d) for layer in model)
    assert has_bn is not name.endswith("-nobn")


def test_models_lists_every_config_with_and_without_batch_norm() -> None:
    assert set(MODELS) == set(CONFIGS) | {f"{c}-nobn" for c in CONFIGS}


def test_build_model_with_the_same_seed_gives_the_same_parameters() -> None:
    first = build_model("vgg11", seed=3).state_dict()
    second = build_model("vgg11", seed=3).state_dict()
    other = build_model("vgg11", seed=4).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first["0.weight"], other["0.weight"])


def test_build_model_seed_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("vgg11", seed=0)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("name", "options", "fragment"),
    [
        ("vgg12", {}, "'vgg12'"),
        ("vgg11-nobn", {"batch_norm": True}, "batch_norm"),
        ("vgg11", {"dropout": 0.5}, "dropout"),
        ("vgg11", {"seed": "1"}, "'1'"),
    ],
)
def test_build_model_rejects_bad_names_and_options(
    name: str, options: dict[str, object], fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(name, **options)
    assert fragment in str(info.value)


def test_build_model_accepts_batch_norm_that_agrees_with_the_name() -> None:
    model = build_model("vgg11-nobn", batch_norm=False, num_classes=4)
    assert model[-1].out_features == 4


@pytest.mark.parametrize("points", [[4], [15], [1], [30], [4, 8], [8, 15, 22, 29]])
def test_partitions_compose_to_the_unsplit_forward_exactly(
    vgg11: nn.Sequential, points: list[int]
) -> None:
    parts = partition(vgg11, points)
    assert len(parts) == len(points) + 1
    assert sum(len(part) for part in parts) == len(vgg11)

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vgg11(x)
        out = x
        for part in parts:
            out = part(out)
    assert torch.equal(out, expected)


def test_partitions_share_the_unsplit_models_layers_and_names(
    vgg11: nn.Sequential,
) -> None:
    parts = partition(vgg11, [8, 15])
    layers = [layer for part in parts for layer in part]
    assert all(a is b for a, b in zip(layers, vgg11, strict=True))

    whole = vgg11.state_dict()
    for part in parts:
        for key, value in part.state_dict().items():
            assert value.data_ptr() == whole[key].data_ptr()


def test_training_across_a_split_gives_the_unsplit_gradients() -> None:
    # Split learning: the second stage receives a detached activation, and
    # the first back-propagates the gradient the second sends back. The cut
    # is right after a convolution, so the second partition starts with a
    # batch norm and a ReLU working on the received leaf tensor.
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])

    whole = build_model("vgg11", seed=0).train()
    nn.functional.cross_entropy(whole(x), y).backward()

    split = build_model("vgg11", seed=0).train()
    first, second = partition(split, [4 * 3 + 1])
    activation = first(x)
    received = activation.detach().requires_grad_()
    nn.functional.cross_entropy(second(received), y).backward()
    assert received.grad is not None
    activation.backward(received.grad)

    for (name, expected), (_, got) in zip(
        whole.named_parameters(), split.named_parameters(), strict=True
    ):
        assert got.grad is not None, name
        torch.testing.assert_close(got.grad, expected.grad, msg=name)


def test_no_split_points_give_one_partition_of_every_layer(
    vgg11: nn.Sequential,
) -> None:
    (only,) = partition(vgg11, [])
    assert list(only) == list(vgg11)


@pytest.mark.parametrize(
    ("points", "fragment"),
    [
        ([0], "0 out of range"),
        ([31], "31 out of range"),
        ([-3], "-3 out of range"),
        ([8, 4], "4 does not follow 8"),
        ([4, 4], "4 does not follow 4"),
        ([4.0], "4.0"),
        ([True], "True"),
    ],
)
def test_bad_split_points_name_the_values_and_the_allowed_range(
    vgg11: nn.Sequential, points: list[int], fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        partition(vgg11, points)
    message = str(info.value)
    assert fragment in message
    assert "1..30" in message


def test_only_sequential_models_can_be_partitioned() -> None:
    with pytest.raises(ConfigError, match="Linear"):
        partition(nn.Linear(2, 2), [1])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "points"),
    [("4", [4]), ("4,8", [4, 8]), (" 4 , 8 ,15 ", [4, 8, 15]), ("8,4", [8, 4])],
)
def test_parse_split_reads_comma_separated_indices(
    text: str, points: list[int]
) -> None:
    assert parse_split(text) == points


@pytest.mark.parametrize("text", ["", "  ", "a", "4,,8", "4.5", "4;8", "4,"])
def test_parse_split_rejects_malformed_text_naming_it(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_split(text)
    assert repr(text) in str(info.value)


def test_default_split_cuts_just_after_max_pools(vgg11: nn.Sequential) -> None:
    for n in range(2, 6):
        points = default_split(vgg11, n)
        assert len(points) == n - 1
        assert all(isinstance(vgg11[p - 1], nn.MaxPool2d) for p in points)
        partition(vgg11, points)
    assert default_split(vgg11, 2) == [15]


def test_default_split_falls_back_to_any_boundary_when_pools_run_out(
    vgg11: nn.Sequential,
) -> None:
    for n in (7, 12, len(vgg11)):
        points = default_split(vgg11, n)
        assert len(points) == n - 1
        partition(vgg11, points)
    assert default_split(vgg11, len(vgg11)) == list(range(1, len(vgg11)))


def test_default_split_into_one_partition_has_no_points(vgg11: nn.Sequential) -> None:
    assert default_split(vgg11, 1) == []


@pytest.mark.parametrize("n", [0, 32, -1])
def test_default_split_rejects_impossible_partition_counts(
    vgg11: nn.Sequential, n: int
) -> None:
    with pytest.raises(ConfigError) as info:
        default_split(vgg11, n)
    assert str(n) in str(info.value)
    assert "1..31" in str(info.value)
