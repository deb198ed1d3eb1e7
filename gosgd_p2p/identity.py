"""Who this node is on the wire: its id, cluster, address and model, and its message headers."""

from __future__ import annotations

import itertools
import secrets

from gosgd_p2p.state import StateLayout
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import MAX_WEIGHT, PROTOCOL_VERSION, Expectation, payload_bytes

__all__ = ["Identity"]


class Identity:
    """The fields every message of this node carries; `address` is set once the server is bound.

    Thread-safe: message ids come from one counter (atomic under the GIL).
    """

    def __init__(
        self,
        node_id: str,
        cluster: str,
        layout: StateLayout,
        max_weight: float = MAX_WEIGHT,
        encoding: pb.Encoding = pb.ENCODING_FP32,
    ) -> None:
        self.node_id = node_id
        self.cluster = cluster
        self.fingerprint = layout.fingerprint
        self.numel = layout.numel
        #: The encoding of this node's pushes (a proto Encoding value) and their payload size.
        self.encoding = encoding
        self.nbytes = payload_bytes(encoding, layout.numel)
        #: HOST:PORT peers use to reach this node ("" until the server is bound).
        self.address = ""
        #: What this node requires of an incoming message's header.
        self.expectation = Expectation(cluster, layout.fingerprint, layout.numel, max_weight)
        # Ids start at a random point: a node restarted under the same id must not reuse
        # the ids of its previous life, which receivers remember as already applied.
        self._message_ids = itertools.count(secrets.randbits(62) + 1)

    def header(
        self, weight: float, step: int, encoding: pb.Encoding | None = None
    ) -> pb.StateHeader:
        """The header of a new message (a fresh id) carrying `weight`, sent at local `step`, in
        `encoding` (None: this node's push encoding)."""
        encoding = self.encoding if encoding is None else encoding
        return pb.StateHeader(
            sender_id=self.node_id,
            message_id=next(self._message_ids),
            weight=weight,
            fingerprint=self.fingerprint,
            encoding=encoding,
            payload_bytes=payload_bytes(encoding, self.numel),
            sender_step=step,
            cluster=self.cluster,
            protocol_version=PROTOCOL_VERSION,
            sender_address=self.address,
        )

    def peer_info(self) -> pb.PeerInfo:
        """This node as a row of a peer list."""
        return pb.PeerInfo(node_id=self.node_id, address=self.address)
