"""The networks a node can train, built by name.

Every model maps a float batch of shape (B, C, H, W) to logits of shape (B, num_classes) and
works on both the bundled 1x8x8 digits and 3x32x32 CIFAR-10. Weights come from torch's default
initialisers, so a caller that wants identical replicas seeds with ``torch.manual_seed`` first.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from gosgd_p2p.config import MODELS

# Width of both hidden layers of the mlp.
MLP_HIDDEN = 128


def mlp(input_shape: tuple[int, int, int], num_classes: int, hidden: int = MLP_HIDDEN) -> nn.Module:
    """Flatten, then two ReLU layers `hidden` wide, then the classes."""
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * height * width, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # No conv bias: the BatchNorm shift that follows makes it redundant.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    # A single 2x pooling keeps 8x8 digits at 4x4 before the global pool; the adaptive pool makes
    # the head independent of the input size.
    return nn.Sequential(
        _conv_bn_relu(input_shape[0], 32),
        _conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        _conv_bn_relu(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut, as in He et al."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem and no max-pool, so small images keep their
    resolution; four stages of two BasicBlocks, widths 64..512, then a global average pool.

    With strides 1, 2, 2, 2 an 8x8 input reaches 1x1 in the last stage, so digits work too.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(in_channels, 64)
        stages: list[nn.Module] = []
        width = 64
        for out_width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(BasicBlock(width, out_width, stride))
            stages.append(BasicBlock(out_width, out_width, 1))
            width = out_width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.pool(self.stages(self.stem(x)))
        return self.fc(out.flatten(1))


def _resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    return ResNet18(input_shape[0], num_classes)


_BUILDERS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "mlp": mlp,
    "cnn": _cnn,
    "resnet18": _resnet18,
}
if tuple(_BUILDERS) != MODELS:  # config.MODELS names them for the CLI, without torch
    raise ImportError(f"config.MODELS {MODELS} does not list the builders {tuple(_BUILDERS)}")


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build a freshly initialised model ``name`` (one of ``MODELS``) in train mode on the CPU.

    ``input_shape`` is (C, H, W) of one example; the model returns logits (B, num_classes).
    Raises ``ValueError`` for a name not in ``MODELS``.
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None
    return builder(input_shape, num_classes)
