"""Refusals: why a call or message is refused, and which gRPC status the caller gets.

Every refusal a peer can cause is a Reject: the server answers it with STATUS_OF[kind] and
the reason, and counts it as rejected_WHY (metrics); nothing refused reaches the inbox.
"""

from __future__ import annotations

from enum import Enum

import grpc

__all__ = ["STATUS_OF", "Reject", "Status", "Why"]


class Status(str, Enum):
    """How a refused call ends: each kind maps to one gRPC status (STATUS_OF)."""

    INVALID = "invalid"  # INVALID_ARGUMENT: the input is malformed or out of bounds
    PRECONDITION = "precondition"  # FAILED_PRECONDITION: valid, but not for this node now
    EXHAUSTED = "exhausted"  # RESOURCE_EXHAUSTED: busy or too large; another peer may take it
    UNAUTHENTICATED = "unauthenticated"  # UNAUTHENTICATED: no valid cluster token
    DENIED = "denied"  # PERMISSION_DENIED: this caller may not make this call


class Why(str, Enum):
    """Why a call was refused: a stable label, counted as gosgd_rejected_total{reason=...}."""

    ABORTED = "aborted"
    AFTER_END = "after_end"
    CALLER_BUSY = "caller_busy"
    CHECKSUM = "checksum"
    CHUNK_SIZE = "chunk_size"
    CLUSTER = "cluster"
    DONATION_BUSY = "donation_busy"
    DONATION_TIMEOUT = "donation_timeout"
    DRAINING = "draining"
    EMPTY_CHUNK = "empty_chunk"
    EMPTY_STREAM = "empty_stream"
    ENCODING = "encoding"
    FINGERPRINT = "fingerprint"
    INBOX_FULL = "inbox_full"
    MALFORMED_CHUNK = "malformed_chunk"
    MALFORMED_HEADER = "malformed_header"
    MALFORMED_MESSAGE = "malformed_message"
    MALFORMED_REQUEST = "malformed_request"
    NOT_A_JOINER = "not_a_joiner"
    NOT_FINITE = "not_finite"
    NO_HEADER = "no_header"
    OFFSET = "offset"
    PAYLOAD_SIZE = "payload_size"
    PROTECTED = "protected"
    PROTOCOL_VERSION = "protocol_version"
    SCALE = "scale"
    SECOND_HEADER = "second_header"
    SENDER_ID = "sender_id"
    SENDERS = "senders"
    STARTING = "starting"
    TOKEN = "token"
    TOO_SLOW = "too_slow"
    TRUNCATED = "truncated"
    WEIGHT = "weight"


class Reject(Exception):
    """A call or message refused before it reached the inbox.

    `kind` says which gRPC status the caller gets, `counter` why (a stable label for metrics),
    and `reason` is one line for the log and the status details.
    """

    def __init__(self, kind: Status, counter: Why, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.counter = counter
        self.reason = reason


#: gRPC status for each Reject kind.
STATUS_OF = {
    Status.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Status.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Status.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Status.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Status.DENIED: grpc.StatusCode.PERMISSION_DENIED,
}
