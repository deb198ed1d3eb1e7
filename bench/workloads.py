"""The training workload of the overhead-style benchmarks (overhead, sender_placement).

One model from the cluster's seed, one fixed batch, SGD with momentum, and the step of the
project's built-in loop shape: forward, backward, optimizer step (the caller adds node.step()).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.time_to_accuracy.wide import bench_model
from gosgd_p2p.config import cluster_seed

CLUSTER = "overhead"  # the gossip cluster's name; seeds the initial model
CLASSES = 10


def input_shape(name: str) -> tuple[int, int, int]:
    """The shape of one example for model `name`: CIFAR-sized for resnet18, digits otherwise."""
    return (3, 32, 32) if name == "resnet18" else (1, 8, 8)


def model(name: str, device: str) -> torch.nn.Module:
    """Model `name` (the package's, or wide_mlp: 2.47 M parameters) on `device`, with the
    initial weights every process of a run shares."""
    torch.manual_seed(cluster_seed(CLUSTER))
    return bench_model(name, input_shape(name), CLASSES).to(device)


@dataclass
class Workload:
    """A model, its optimizer and one fixed batch; step() trains on it once."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor

    def step(self) -> None:
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def workload(name: str, batch_size: int, device: str) -> Workload:
    """Model `name` on `device` with SGD (lr 0.01, momentum 0.9) and a batch drawn from seed 0."""
    net = model(name, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_shape(name), generator=gen).to(device)
    y = torch.randint(0, CLASSES, (batch_size,), generator=gen).to(device)
    return Workload(net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), x, y)
