"""gosgd-health: exit 0 when a node reports SERVING on grpc.health.v1, 1 otherwise.

For container HEALTHCHECKs and scripts: `gosgd-health --address 127.0.0.1:7070`. With mutual
TLS, pass the same --tls-* files as the node. The health service needs no cluster token.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gosgd_p2p.security import Credentials

__all__ = ["check", "main"]


def check(address: str, credentials: Credentials | None = None, timeout: float = 3.0) -> str:
    """The node's health status name (SERVING, NOT_SERVING, ...); raises grpc.RpcError."""
    with (credentials or Credentials()).open_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gosgd-health", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:7070", help="HOST:PORT of the node")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-ca")
    args = parser.parse_args(argv)
    try:
        creds = Credentials.from_files(None, args.tls_cert, args.tls_key, args.tls_ca)
        status = check(args.address, creds, args.timeout)
    except ValueError as err:
        print(f"gosgd-health: error: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"gosgd-health: {args.address}: {err.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
