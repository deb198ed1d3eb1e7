"""Shapes, buffers and trainability of the models in gosgd_p2p.models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gosgd_p2p.data import load_dataset
from gosgd_p2p.models import MODELS, build_model

torch.set_num_threads(1)

DIGITS_SHAPE = (1, 8, 8)
CIFAR_SHAPE = (3, 32, 32)


def test_models_lists_the_three_architectures() -> None:
    assert MODELS == ("mlp", "cnn", "resnet18")


@pytest.mark.parametrize("shape", [DIGITS_SHAPE, CIFAR_SHAPE], ids=["digits", "cifar"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_have_batch_by_classes_shape(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=7)
    for train in (True, False):
        model.train(train)
        logits = model(torch.randn(3, *shape))
        assert logits.shape == (3, 7)
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_conv_models_have_batchnorm_buffers(name: str) -> None:
    model = build_model(name, DIGITS_SHAPE, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    float_buffers = [n for n, b in model.named_buffers() if b.is_floating_point()]
    assert any(n.endswith("running_mean") for n in float_buffers)
    assert any(n.endswith("running_var") for n in float_buffers)


def test_mlp_has_no_buffers() -> None:
    assert list(build_model("mlp", DIGITS_SHAPE, 10).buffers()) == []


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_gives_identical_weights(name: str) -> None:
    torch.manual_seed(3)
    a = build_model(name, DIGITS_SHAPE, 10).state_dict()
    torch.manual_seed(3)
    b = build_model(name, DIGITS_SHAPE, 10).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_model_raises_one_line_naming_choices() -> None:
    with pytest.raises(ValueError) as info:
        build_model("vgg", DIGITS_SHAPE, 10)
    message = str(info.value)
    assert "\n" not in message
    assert "vgg" in message
    assert all(name in message for name in MODELS)


def test_a_few_sgd_steps_reduce_mlp_loss_on_digits() -> None:
    data = load_dataset("digits")
    x, y = data.train_x[:256], data.train_y[:256]
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    with torch.no_grad():
        before = loss().item()
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.5 * before
