"""gosgd-p2p: peer-to-peer decentralized deep learning with GoSGD sum-weight gossip over gRPC.

The Python API: wrap a model in a GossipNode, call node.step() after each optimizer step,
and node.finish() then node.close() at the end. See README.md.
"""

from gosgd_p2p.algorithm import consensus, halve, merge_
from gosgd_p2p.config import NodeConfig, TrainConfig, cluster_seed
from gosgd_p2p.node import GossipNode, JoinError

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
