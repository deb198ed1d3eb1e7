"""gosgd-p2p: peer-to-peer decentralized deep learning with GoSGD sum-weight gossip over gRPC.

The Python API: wrap a model in a GossipNode, call node.step() after each optimizer step,
and node.finish() then node.close() at the end. See README.md.
"""

from typing import TYPE_CHECKING, Any

from gosgd_p2p.config import NodeConfig, TrainConfig, cluster_seed

if TYPE_CHECKING:
    from gosgd_p2p.algorithm import consensus, halve, merge_
    from gosgd_p2p.node import GossipNode, JoinError

# torch is imported on first use, so small tools (gosgd-health, gosgd-certs) start fast
_LAZY = {
    "GossipNode": "gosgd_p2p.node",
    "JoinError": "gosgd_p2p.node",
    "consensus": "gosgd_p2p.algorithm",
    "halve": "gosgd_p2p.algorithm",
    "merge_": "gosgd_p2p.algorithm",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gosgd_p2p' has no attribute {name!r}")


__all__ = [
    "GossipNode",
    "JoinError",
    "NodeConfig",
    "TrainConfig",
    "cluster_seed",
    "consensus",
    "halve",
    "merge_",
]
__version__ = "0.1.0"
