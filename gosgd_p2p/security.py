"""Who may talk to a node: a shared cluster token, and optional mutual TLS.

- Token: every call carries metadata `x-gosgd-token`; the server compares it in constant time
  and answers UNAUTHENTICATED otherwise. Every RPC needs it except grpc.health.v1 (so probes
  work without the secret).
- Protected mode: a node with neither answers Gossip calls from loopback addresses only
  (like Redis's protected mode), unless it is started insecure on purpose (a trusted LAN).
- Mutual TLS: the server requires a client certificate signed by the cluster CA, and clients
  verify the server's. Node certificates carry the DNS name TLS_TARGET_NAME, which clients
  expect whatever address they dial (peers are found by IP, not by name).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gosgd_p2p.config import parse_address

__all__ = [
    "TLS_TARGET_NAME",
    "TOKEN_METADATA_KEY",
    "Credentials",
    "TokenInterceptor",
    "is_loopback",
    "is_loopback_host",
    "peer_host",
    "say_who_may_call",
]

log = logging.getLogger(__name__)

#: Call metadata key of the cluster token.
TOKEN_METADATA_KEY = "x-gosgd-token"
#: The DNS name every node certificate carries and every client verifies.
TLS_TARGET_NAME = "gosgd-node"
#: Services callable without the token.
OPEN_SERVICES = ("/grpc.health.v1.Health/",)


def peer_host(peer: str) -> str:
    """ "ipv4:10.0.0.2:51234" -> "10.0.0.2"; "ipv6:[::1]:5" -> "::1"; other forms unchanged."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or not rest:
        return peer or "unknown peer"
    host = rest.rpartition(":")[0] or rest
    return host.strip("[]")


def is_loopback(peer: str) -> bool:
    """Whether a gRPC peer string (context.peer()) is a loopback address (or a Unix socket)."""
    return peer.startswith("unix:") or is_loopback_host(peer_host(peer))


def is_loopback_host(host: str) -> bool:
    """Whether `host` (an IP address, or "localhost") is a loopback address."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def say_who_may_call(loopback_only: bool, credentials: Credentials, listen: str) -> None:
    """Log once, at a node's start, who may call it and how to open it."""
    if loopback_only:
        off_loopback = not is_loopback_host(parse_address(listen)[0])
        (log.warning if off_loopback else log.info)(
            "protected mode: no cluster token or TLS, so only callers on this host may gossip "
            "with this node (health stays open); to open it, give every node the same "
            "--token-file (gosgd-certs writes one), or pass --insecure on a trusted LAN"
        )
    elif not credentials.protected:
        log.warning(
            "insecure: no cluster token or TLS, and anyone who reaches %s may push state and "
            "weight, take weight (FetchState) and steer membership; use on a trusted LAN only",
            listen,
        )


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror}") from None
    if not data.strip():
        raise ValueError(f"{what} {path} is empty")
    return data


@dataclass(frozen=True)
class Credentials:
    """The secrets a node uses on both ends; empty means an open (insecure) cluster."""

    token: bytes | None = None
    cert: bytes | None = None  # this node's certificate chain (PEM)
    key: bytes | None = None  # its private key (PEM)
    ca: bytes | None = None  # the cluster CA certificate (PEM)

    @classmethod
    def from_files(
        cls,
        token_file: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
    ) -> Credentials:
        """Load the configured files; ValueError with one line naming the problem."""
        token = _read(token_file, "token file").strip() if token_file else None
        if token is not None and not all(0x21 <= c <= 0x7E for c in token):
            # gRPC metadata carries printable ASCII only; anything else fails every call
            raise ValueError(f"token file {token_file}: use printable ASCII without spaces")
        tls = [tls_cert, tls_key, tls_ca]
        if any(tls) and not all(tls):
            raise ValueError("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca")
        if tls_cert and tls_key and tls_ca:
            return cls(
                token,
                _read(tls_cert, "TLS certificate"),
                _read(tls_key, "TLS key"),
                _read(tls_ca, "TLS CA"),
            )
        return cls(token)

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def protected(self) -> bool:
        """Whether callers must prove they belong (a token, or a certificate for mTLS)."""
        return self.token is not None or self.tls

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        assert self.key is not None and self.cert is not None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", TLS_TARGET_NAME)] if self.tls else []

    def open_channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to `address` that speaks TLS when this node does, with `options` added."""
        options = [*options, *self.channel_options()]
        creds = self.channel_credentials()
        if creds is None:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, creds, options=options)

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        if self.token is None:
            return None
        return ((TOKEN_METADATA_KEY, self.token.decode()),)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call without the cluster token (health checks excepted).

    `on_reject(method, peer_hint)` is called for each refused call, for counters and logs.
    """

    def __init__(self, token: bytes, on_reject: Callable[[str], None]) -> None:
        self._token = token
        self._on_reject = on_reject

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        method: str = handler_call_details.method
        if method.startswith(OPEN_SERVICES):
            return continuation(handler_call_details)
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                presented = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(presented, self._token):
            return continuation(handler_call_details)
        self._on_reject(method)
        handler = continuation(handler_call_details)
        return _refusal(handler)


def _refusal(handler: Any) -> Any:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""

    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)
