"""The benchmark's models: the package's (gosgd_p2p.models), and `wide_mlp`, a model whose
state is large beside its compute, so that the network, not the CPU, sets the pace."""

from __future__ import annotations

from torch import nn

from gosgd_p2p.config import MODELS
from gosgd_p2p.models import build_model, mlp

#: Width of wide_mlp's two hidden layers: 2.47 M parameters on 8x8 inputs (9.9 MB in fp32).
WIDE_HIDDEN = 1536
BENCH_MODELS = (*MODELS, "wide_mlp")


def bench_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Model `name` (one of BENCH_MODELS), freshly initialised, on the CPU."""
    if name != "wide_mlp":
        return build_model(name, input_shape, num_classes)
    return mlp(input_shape, num_classes, hidden=WIDE_HIDDEN)
