"""gosgd-status: what every node of a cluster is doing, and whether the weight adds up.

    gosgd-status 127.0.0.1:7070 [--token-file cluster.token] [--watch] [--json]

It asks one node (Status, a read-only RPC authenticated like every Gossip call), learns the
membership from the peers that node knows, asks every node it learns of, and prints a table.
Below it: the weight the nodes that answered hold (a, plus messages waiting in their inboxes),
the weight they report in flight, and the founders' total, which the sum must equal: the
cluster's conservation law, checked from outside. The founders' total is the sum of the
weights the answering nodes founded with; when a founder has left, say it with
--expect-total. Nodes are asked one after another, so while they train a message moving
between two answers can be counted twice or missed; once every node has finished (state
finished, nothing in flight) the sum is exact.

Exit status: 0 when the first node answered, 1 when it did not (one line says why), 2 for
bad flags. Imports no torch.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from gosgd_p2p.cli import OneLineParser, add_security_flags
from gosgd_p2p.client import PeerClient
from gosgd_p2p.config import parse_address
from gosgd_p2p.security import Credentials
from gosgd_p2p.v1 import gossip_pb2 as pb

__all__ = ["Survey", "main", "survey"]

#: Below this difference, the weight held plus in flight equals the founders' total: far
#: above float64 rounding of sums of a few thousand weights, far below any message's weight.
EXACT = 1e-9
#: At most this many nodes are asked in one survey.
MAX_NODES = 1024
#: Nodes asked at once.
PARALLEL = 16

#: What a refused first call means, and the fix.
WHY = {
    grpc.StatusCode.UNAUTHENTICATED: "missing or wrong cluster token: pass --token-file "
    "with the cluster's token (or the --tls-* files its nodes use)",
    grpc.StatusCode.PERMISSION_DENIED: "refused",
    grpc.StatusCode.UNAVAILABLE: "cannot reach it: is a node listening there? (with mutual "
    "TLS, pass --tls-cert, --tls-key and --tls-ca)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "no answer in time",
    grpc.StatusCode.UNIMPLEMENTED: "this node has no Status call (an older gosgd-p2p)",
}


def _state_name(state: int) -> str:
    return pb.NodeState.Name(state).removeprefix("NODE_STATE_").lower()  # type: ignore[arg-type]


@dataclass
class Survey:
    """One round of questions: the replies by address, and the nodes that did not answer."""

    replies: dict[str, pb.StatusReply] = field(default_factory=dict)
    #: address -> gRPC status code name of a node that did not answer.
    failed: dict[str, str] = field(default_factory=dict)
    #: The founders' total given by the operator (--expect-total), else None.
    expect_total: float | None = None

    def seen(self, node_id: str, address: str) -> tuple[float | None, str | None]:
        """Seconds since any answering node last heard from this node, and how that node
        sees it ("live", "suspended", "left"), from the freshest view; (None, None) if none."""
        best: tuple[float | None, str | None] = (None, None)
        for reply in self.replies.values():
            for p in reply.peers:
                same = (p.node_id and p.node_id == node_id) or p.address == address
                if same and (best[0] is None or p.last_seen_seconds < best[0]):
                    best = (p.last_seen_seconds, p.status)
        return best

    def totals(self) -> dict[str, Any]:
        """The conservation check: held, in flight, the founders' total and the verdict."""
        replies = list(self.replies.values())
        held = math.fsum(r.weight + r.inbox_weight for r in replies)
        in_flight = math.fsum(r.in_flight_weight for r in replies)
        written_off = math.fsum(r.weight_written_off for r in replies)
        if self.expect_total is not None:
            founders, source = self.expect_total, "--expect-total"
        else:
            founders = math.fsum(r.founded_weight for r in replies)
            source = f"{sum(r.founded_weight > 0 for r in replies)} founder(s) answered"
        if not in_flight and abs(held - founders) <= EXACT:
            check = "exact"
        elif held - EXACT <= founders <= held + in_flight + EXACT:
            check = "within in-flight"
        else:
            check = "off"
        return {
            "held": held,
            "in_flight": in_flight,
            "founders_total": founders,
            "founders_from": source,
            "difference": held - founders,
            "written_off": written_off,
            "check": check,
        }

    def to_json(self) -> dict[str, Any]:
        nodes = []
        for address, r in sorted(self.replies.items(), key=lambda kv: kv[1].node_id):
            seen, _ = self.seen(r.node_id, address)
            nodes.append(
                {
                    "node_id": r.node_id,
                    "address": r.address or address,
                    "state": _state_name(r.state),
                    "step": r.step,
                    "steps_per_second": r.steps_per_second,
                    "weight": r.weight,
                    "inbox_weight": r.inbox_weight,
                    "in_flight_weight": r.in_flight_weight,
                    "in_flight_pushes": r.in_flight_pushes,
                    "founded_weight": r.founded_weight,
                    "weight_written_off": r.weight_written_off,
                    "last_loss": r.last_loss if r.HasField("last_loss") else None,
                    "messages_sent": r.messages_sent,
                    "messages_received": r.messages_received,
                    "messages_returned": r.messages_returned,
                    "last_seen_seconds": seen,
                    "uptime_seconds": r.uptime_seconds,
                }
            )
        missing = []
        for address, code in sorted(self.failed.items()):
            node_id = self._named(address)
            _, view = self.seen(node_id or "", address)
            missing.append(
                {"node_id": node_id, "address": address, "error": code, "peers_say": view}
            )
        return {"nodes": nodes, "not_answering": missing, **self.totals()}

    def _named(self, address: str) -> str | None:
        """The node id the answering nodes know for `address`, if any."""
        for reply in self.replies.values():
            for p in reply.peers:
                if p.address == address and p.node_id:
                    return p.node_id
        return None

    def table(self) -> str:
        """The table and the conservation line, as gosgd-status prints them."""
        data = self.to_json()
        head = ("node", "address", "state", "step", "steps/s", "weight", "in flight", "loss",
                "sent", "recv", "ret", "seen")  # fmt: skip
        rows: list[tuple[str, ...]] = []
        for n in data["nodes"]:
            rows.append(
                (
                    n["node_id"],
                    n["address"],
                    n["state"],
                    str(n["step"]),
                    f"{n['steps_per_second']:.1f}",
                    f"{n['weight'] + n['inbox_weight']:.6f}",
                    f"{n['in_flight_weight']:.6f}",
                    "-" if n["last_loss"] is None else f"{n['last_loss']:.4f}",
                    str(n["messages_sent"]),
                    str(n["messages_received"]),
                    str(n["messages_returned"]),
                    _ago(n["last_seen_seconds"]),
                )
            )
        for m in data["not_answering"]:
            state = m["peers_say"] if m["peers_say"] == "left" else f"no answer ({m['error']})"
            rows.append((m["node_id"] or "?", m["address"], state, *("",) * 9))
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in (head, *rows)]  # fmt: skip
        t = data
        lines.append(
            f"weight at {len(data['nodes'])} node(s) {t['held']:.9f} + in flight "
            f"{t['in_flight']:.9f} = {t['held'] + t['in_flight']:.9f}; founders' total "
            f"{t['founders_total']:.9g} ({t['founders_from']})"
        )
        lines.append(f"conservation: {_verdict(t, len(data['not_answering']))}")
        return "\n".join(lines)


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s ago"


def _verdict(t: dict[str, Any], missing: int) -> str:
    if t["check"] == "exact":
        text = f"exact (held - founders = {t['difference']:.3g})"
    elif t["check"] == "within in-flight":
        text = "within in-flight bounds (held <= founders <= held + in flight)"
    else:
        text = (
            f"off by {t['difference']:+.6g}: a node did not answer, a founder left (pass "
            "--expect-total), weight was written off, or a message moved between two answers "
            "(ask again)"
        )
    if t["written_off"]:
        text += f"; {t['written_off']:.6g} written off so far"
    if missing:
        text += f"; {missing} known node(s) did not answer"
    return text


def survey(
    client: PeerClient,
    address: str,
    timeout: float = 3.0,
    expect_total: float | None = None,
) -> Survey:
    """Ask `address`, then every node it and the others know of (breadth first, at most
    MAX_NODES). Raises grpc.RpcError when `address` itself does not answer."""
    result = Survey(expect_total=expect_total)
    result.replies[address] = client.status(address, timeout)
    ids = {result.replies[address].node_id}
    asked = {address, result.replies[address].address}
    frontier = [address]
    with ThreadPoolExecutor(PARALLEL, thread_name_prefix="gosgd-status") as pool:
        while frontier:
            learned = [
                p.address
                for a in frontier
                for p in result.replies[a].peers
                if p.address and p.address not in asked and p.node_id not in ids
            ]
            learned = list(dict.fromkeys(learned))[: MAX_NODES - len(asked)]
            asked.update(learned)
            answers = list(pool.map(lambda a: _ask(client, a, timeout), learned))
            frontier = []
            for a, answer in zip(learned, answers, strict=True):
                if isinstance(answer, str):
                    result.failed[a] = answer
                elif answer.node_id not in ids:  # the same node under a second address
                    ids.add(answer.node_id)
                    result.replies[a] = answer
                    frontier.append(a)
    return result


def _ask(client: PeerClient, address: str, timeout: float) -> pb.StatusReply | str:
    try:
        return client.status(address, timeout)
    except grpc.RpcError as err:
        return str(err.code().name)  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        prog="gosgd-status",
        description="Ask one node of a gosgd-p2p cluster, learn the others from it, ask them "
        "all, and print a table with the cluster's total weight checked.",
    )
    parser.add_argument("address", help="HOST:PORT of any node of the cluster")
    parser.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    parser.add_argument("--interval", type=float, default=2.0, help="--watch period, seconds")
    parser.add_argument("--json", action="store_true", help="print JSON (one line per round)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per node")
    parser.add_argument(
        "--expect-total",
        type=float,
        default=None,
        help="the founders' total weight (default: the sum over the founders that answer; "
        "needed once a founder has left)",
    )
    add_security_flags(parser)
    args = parser.parse_args(argv)
    try:
        parse_address(args.address)
        credentials = Credentials.from_files(
            args.token_file, args.tls_cert, args.tls_key, args.tls_ca
        )
    except ValueError as err:
        parser.error(str(err))
    client = PeerClient(credentials)
    try:
        while True:
            code = _round(client, args)
            if not args.watch or code == 2:
                return min(code, 1)
            time.sleep(args.interval)  # the refresh period of --watch
    except KeyboardInterrupt:
        return 0
    finally:
        client.close()


def _round(client: PeerClient, args: Any) -> int:
    """One survey, printed; 0 when the first node answered, 1 when it did not (and 2 when
    asking again cannot help: the credentials are wrong)."""
    try:
        result = survey(client, args.address, args.timeout, args.expect_total)
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        why = WHY.get(code, "failed")
        if code is grpc.StatusCode.PERMISSION_DENIED:
            why = f"refused: {err.details()}"  # type: ignore[attr-defined]
        print(f"gosgd-status: {args.address}: {why} ({code.name})", file=sys.stderr, flush=True)
        fatal = code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
        return 2 if fatal else 1
    if args.json:
        print(json.dumps(result.to_json()), flush=True)
    else:
        if args.watch and sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")  # clear the screen between refreshes
        print(result.table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
