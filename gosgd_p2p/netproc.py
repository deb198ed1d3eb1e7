"""The network side of a node in a process of its own (NodeConfig.network_process).

Why: gRPC's Python code runs under the GIL, which the server's threads share with the
training thread; receiving costs the training loop more than sending does (docs/benchmarks.md).
In this mode the gRPC server (Gossip with every RPC, health, reflection), the client (pushes,
and the Hello, ResolvePush and Status calls that membership and the sender make) and mDNS
(zeroconf) run in a child process that imports no torch. The training process keeps the model,
the weight a, the inbox with its fate memory, the merge, the peer table and the decisions of
membership and of settling pushes. A joiner's one FetchState runs there too, before it trains;
its channel is closed after it.

How they meet: shared memory and a small control channel (Unix SOCK_SEQPACKET socket pairs).
- Pushes out: as send_process (sendproc.py), the child streams a send buffer it shares with the
  node and answers with the ack or the failure.
- Pushes in: the child checks the header, takes a receive slot (shared memory, one per inbox
  place), streams the payload into it and checks its CRC (intake.py, the front half), and
  that a float32 payload is finite (numpy). Then, only while the call is alive, it asks the
  training process to commit slot r: that process decodes any other encoding and checks its
  values (torch kernels that release the GIL), commits to its inbox under the fate memory,
  counts the message received, and answers; then the child acks the sender. While the
  training thread steps, a float32 commit is posted for it to take at its next step (a
  shared board says how many were posted and when it last looked), so no other thread of
  the training process wakes for it; one not taken within POLL_WAIT_S, or any commit while
  the training thread does not step, goes to an answer thread. One request a
  message: a call that dies after the commit leaves its message committed (threads mode
  takes it back out when it still can), and its sender learns so by ResolvePush, which
  answers COMMITTED, so no weight is lost or counted twice. The committed slot is the
  message's payload: it is merged straight from shared memory and handed back to the child
  afterwards ("release r").
- Hello, ResolvePush and Status are forwarded as they are; the answers come from the training
  process, which owns the peer table, the fates and the counters.
- The training process's own unary calls go the other way: the child makes them and answers
  with the reply or the gRPC status, raised here as RemoteRpcError. A question can be asked
  twice, so a call the child died in is made again from this process.
- mDNS: the child runs MdnsDiscovery and passes each node it finds to the peer table.
- A donation to a joiner: the child takes a slot, the training thread snapshots into it and
  splits its weight, and the child streams it.

Why this split: every decision about weight stays with the one process that holds the weight,
so exactness needs no new protocol between the two. The child holds weight in no form: a
message is either committed by the training process (and merged from shared memory, whatever
happens to the child) or refused.

When the child dies (kill -9): pushes it was making fail as "maybe delivered" and are settled
with ResolvePush from the training process; a message committed but not yet acked stays
committed (its sender's ResolvePush learns so); a donation still streaming comes back to the
inbox, and one whose last chunk had been handed over is written off (never invented). The node
then serves gRPC from its own threads on the same port, pushes and calls from them, and runs
mDNS itself (threads mode), saying so. When the training process dies, the child reads
end-of-file and exits.

Run as `python -m gosgd_p2p.netproc SPEC` by NetworkProcess only.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import pickle
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from gosgd_p2p.client import PeerClient
from gosgd_p2p.discovery import MdnsDiscovery
from gosgd_p2p.intake import Intake
from gosgd_p2p.reject import Reject, Status, Why
from gosgd_p2p.security import Credentials
from gosgd_p2p.sendproc import (
    ANSWER_MARGIN_S,
    RECORD_BYTES,
    START_TIMEOUT_S,
    SendProcessClient,
    serve_requests,
    start_child,
)
from gosgd_p2p.server import GossipServer
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import Chunk, Expectation, float32_finite, split_for_streaming

if TYPE_CHECKING:
    import torch

    from gosgd_p2p.inbox import Message
    from gosgd_p2p.membership import Membership
    from gosgd_p2p.receiver import Receiver
    from gosgd_p2p.reporter import Reporter

__all__ = ["NetworkProcess", "RemoteServer"]

log = logging.getLogger(__name__)

#: Largest request or answer between the two processes (a Status reply with its peers).
CALL_BYTES = 1 << 17
#: Requests the child's server threads may have open with the training process at once.
CALLERS = 8
#: Unary calls (Hello, ResolvePush, Status) the training process may have the child make at
#: once; more wait for one to end.
CALLS = 4
#: A commit waits this long for the training thread to take it at its next step before the
#: child asks for it on an answer thread, seconds; the child asks there at once when the
#: training thread has not stepped for this long.
POLL_WAIT_S = 0.005


class _Board:
    """Two numbers the processes share: how many commit requests the child has posted (it
    writes), and when the training thread last looked for them (it writes, monotonic s)."""

    NBYTES = 16

    def __init__(self, area: mmap.mmap) -> None:
        view = memoryview(area)
        self.posted = view[0:8].cast("q")
        self.polled = view[8:16].cast("d")


class RemoteRpcError(grpc.RpcError):
    """A unary call that the network process made and that failed as grpc.RpcError there."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class NetworkProcess(SendProcessClient):
    """The node's side of a network process: the send buffers and pushes of SendProcessClient,
    plus `slots` receive slots (float32 tensors of `slot_numel`) that the child receives into.

    serve() starts the child's gRPC server, once the node's parts exist.
    """

    WHAT = "network process"
    CHILD = "gosgd_p2p.netproc"

    def __init__(
        self,
        credentials: Credentials | None,
        nbytes: int,
        count: int,
        *,
        slot_numel: int,
        slots: int,
        server: dict[str, Any],
        tune_malloc: bool = True,
    ) -> None:
        import torch

        self._slot_bytes = 4 * slot_numel
        memfds: list[int] = []
        ours: list[socket.socket] = []
        theirs: list[socket.socket] = []
        try:
            board_fd = os.memfd_create("gosgd-board")
            memfds.append(board_fd)
            os.ftruncate(board_fd, _Board.NBYTES)
            self._board = _Board(mmap.mmap(board_fd, _Board.NBYTES))
            self.slots: list[torch.Tensor] = []
            for i in range(slots):
                fd = os.memfd_create(f"gosgd-recv-{i}")
                memfds.append(fd)
                os.ftruncate(fd, self._slot_bytes)
                area = mmap.mmap(fd, self._slot_bytes)
                self.slots.append(torch.frombuffer(area, dtype=torch.float32))
            # the child's requests, ours, and the commits the training thread takes
            for _ in range(CALLERS + CALLS + 1):
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                for s in (a, b):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CALL_BYTES)
                ours.append(a)
                theirs.append(b)
            extra = {
                "log_name": "gosgd-net",
                "board": board_fd,
                "slots": memfds[1:],
                "slot_bytes": self._slot_bytes,
                "callers": [s.fileno() for s in theirs[:CALLERS]],
                "calls": [s.fileno() for s in theirs[CALLERS:-1]],
                "commits": theirs[-1].fileno(),
                "server": server,
            }
            super().__init__(
                credentials,
                nbytes,
                count,
                tune_malloc=tune_malloc,
                extra=extra,
                extra_fds=[*memfds, *(s.fileno() for s in theirs)],
            )
        except BaseException:
            for s in ours:
                s.close()
            raise
        finally:
            for fd in memfds:
                os.close(fd)
            for s in theirs:
                s.close()
        self._callers = ours[:CALLERS]
        self._calls: queue.Queue[socket.socket] = queue.Queue()
        for conn in ours[CALLERS:-1]:
            self._calls.put(conn)
        self._call_sockets = ours[CALLERS:]
        self._commits = ours[-1]
        self._commits.setblocking(False)
        self._commits_lock = threading.Lock()  # the training thread's, or an answer thread's
        self._taken = 0  # the board's count when the commits were last taken
        self._slot_index = {t.data_ptr(): i for i, t in enumerate(self.slots)}
        self._lock = threading.Lock()
        #: slot -> the message committed (or donation split) into it, until it is released
        self._held: dict[int, Message] = {}
        #: slots whose message is being committed (a release then ends the commit's hold)
        self._committing: set[int] = set()
        #: slot -> whether a donation's last chunk is out (then its weight may be the joiner's)
        self._donating: dict[int, bool] = {}
        self._closing = False
        self._remote: RemoteServer | None = None
        self._discovery: RemoteDiscovery | None = None

    def serve(
        self,
        receiver: Receiver,
        membership: Membership,
        reporter: Reporter,
        listen_host: str,
        fallback: Callable[[str], GossipServer],
    ) -> RemoteServer:
        """Start the child's gRPC server and answer its requests from these parts. When the
        child dies, `fallback(listen)` serves from this process on `listen_host` and the same
        port."""
        self._receiver = receiver
        self._membership = membership
        self._reporter = reporter
        self._threads = [
            threading.Thread(
                target=self._answer, args=(conn,), name=f"gosgd-net-answer-{i}", daemon=True
            )
            for i, conn in enumerate(self._callers)
        ]
        for t in self._threads:
            t.start()
        with self._control_lock:
            self._control.settimeout(START_TIMEOUT_S)
            try:
                self._control.send(pickle.dumps(("serve", None)))
                answer = self._control.recv(RECORD_BYTES)
            except OSError:
                answer = b""
            finally:
                self._control.settimeout(None)
        reply: tuple[Any, ...] = (
            pickle.loads(answer) if answer else ("error", "the network process did not answer")
        )
        if reply[0] != "serving":
            raise OSError(reply[1])
        _, port, loopback_only = reply
        self._remote = RemoteServer(self, port, loopback_only, listen_host, fallback)
        threading.Thread(target=self._watch, name="gosgd-net-watch", daemon=True).start()
        return self._remote

    def close(self) -> None:
        self._closing = True
        if self._discovery is not None:
            self._discovery.close()
        super().close()
        for conn in [*self._callers, *self._call_sockets]:
            conn.close()

    def unary(self, address: str, method: str, request: bytes, timeout: float) -> bytes:
        """As PeerClient.unary, made by the child; here once the child is gone."""
        if self._dead:
            return super().unary(address, method, request, timeout)
        conn = self._calls.get()
        try:
            conn.settimeout(timeout + ANSWER_MARGIN_S)
            conn.send(pickle.dumps(("call", address, method, request, timeout)))
            answer = conn.recv(CALL_BYTES)
        except TimeoutError:
            self._lost_child(f"no answer to a {method} call past its deadline; killed it")
            answer = b""
        except OSError as err:
            if err.errno == errno.EMSGSIZE:  # a request too large to pass on: make it here
                return super().unary(address, method, request, timeout)
            self._lost_child(str(err))
            answer = b""
        finally:
            self._calls.put(conn)
        if not answer:  # the call is a question: asking it again is safe
            self._lost_child(f"it exited during a {method} call")
            return super().unary(address, method, request, timeout)
        kind, *rest = pickle.loads(answer)
        if kind == "reply":
            reply: bytes = rest[0]
            return reply
        if kind == "rpc_error":
            raise RemoteRpcError(grpc.StatusCode[rest[0]], rest[1])
        return super().unary(address, method, request, timeout)  # the child could not make it

    def fetch(self, address: str, request: pb.FetchRequest, timeout: float) -> Iterator[Chunk]:
        """As PeerClient.fetch, from this process (a joiner's one call, before it trains); the
        channel closes after it, so that every later call is the child's."""
        try:
            yield from super().fetch(address, request, timeout)
        finally:
            PeerClient.forget(self, address)

    def discovery(
        self,
        node_id: str,
        cluster: str,
        protocol_version: int,
        address: tuple[str, int],
        on_found: Callable[[str, str], None],
        interface: str | None,
    ) -> RemoteDiscovery:
        """A DiscoveryFactory: MdnsDiscovery run by the child (zeroconf's threads and sockets
        with it), by this process once the child is gone. One per node."""
        args = (node_id, cluster, protocol_version, address)
        self._discovery = RemoteDiscovery(self, args, on_found, interface)
        return self._discovery

    def tell(self, kind: str, arg: Any) -> bool:
        """Send a one-way control record to the child; False if it is gone."""
        if self._dead:
            return False
        try:
            with self._control_lock:
                self._control.send(pickle.dumps((kind, arg)))
            return True
        except OSError:
            return False

    # --- answering the child's requests (gosgd-net-answer-* threads) ----------------------------

    def _answer(self, conn: socket.socket) -> None:
        while True:
            try:
                request = conn.recv(CALL_BYTES)
            except OSError:
                return
            if not request:
                return  # the child is gone
            kind, *args = pickle.loads(request)
            if kind == "take":  # a commit the training thread did not take in time
                self._take_commits()
            elif not self._reply(conn, kind, args):
                return

    def take_commits(self) -> None:
        """Answer the commit requests the child has posted since the last call (the training
        thread, at each step): the commit then costs no other thread's wake-up or GIL."""
        self._board.polled[0] = time.monotonic()
        if self._board.posted[0] != self._taken:
            self._take_commits()

    def _take_commits(self, wait: bool = False) -> None:
        """Answer every posted commit. Without `wait` (the training thread never waits), none
        when another thread is taking them: that thread looks again once it has let go, so
        a commit posted after its last read is taken although nobody steps again."""
        while self._commits_lock.acquire(blocking=wait):
            try:
                self._taken = self._board.posted[0]  # read first: a later post is seen below
                self._answer_posted()
            finally:
                self._commits_lock.release()
            # a take that found the lock held since our last read left its commit to us
            if self._board.posted[0] == self._taken:
                return

    def _answer_posted(self) -> None:
        """Answer the commit requests in the socket now (under the commits lock)."""
        while True:
            try:
                request = self._commits.recv(CALL_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the child is gone: the watch thread sees to it
            if not request:
                return
            caller, kind, *args = pickle.loads(request)
            self._reply(self._callers[caller], kind, args)

    def _reply(self, conn: socket.socket, kind: str, args: list[Any]) -> bool:
        """Answer one request of the child on `conn`; False if the child is gone."""
        try:
            answer: tuple[Any, ...] = ("ok", getattr(self, f"_on_{kind}")(*args))
        except Reject as reject:
            answer = ("reject", reject.kind.value, reject.counter.value, reject.reason)
        except Exception as err:  # the call fails as UNKNOWN, as in threads mode
            log.exception("the network process's %s request failed", kind)
            answer = ("error", f"{type(err).__name__}: {err}")
        try:
            conn.send(pickle.dumps(answer))
        except OSError as err:
            if err.errno != errno.EMSGSIZE:
                return False  # the child is gone
            log.error("the answer to a %s request is too large to pass on", kind)
            conn.send(pickle.dumps(("error", "answer too large")))
        return True

    def _on_commit(self, header_bytes: bytes, slot: int) -> tuple[bytes, bool]:
        header = pb.StateHeader.FromString(header_bytes)
        with self._lock:  # once committed, it may be merged and released at once
            self._committing.add(slot)
        msg = None
        try:
            # the child asked only while the call was alive; committed, it stays so (see above)
            ack, msg = self._receiver.commit_received(
                header, self.slots[slot], lambda: True, self._release, checked=True
            )
        finally:
            with self._lock:  # one section: a release between two would leave a stale hold
                if msg is not None and slot in self._committing:  # not merged and released yet
                    self._held[slot] = msg
                self._committing.discard(slot)
        return ack.SerializeToString(), msg is not None

    def _on_resolve(self, raw: bytes, peer: str) -> bytes:
        request = pb.ResolveRequest.FromString(raw)
        return self._receiver.resolve_push(request, peer).SerializeToString()

    def _on_hello(self, raw: bytes, peer: str) -> bytes:
        return self._membership.hello(pb.HelloRequest.FromString(raw), peer).SerializeToString()

    def _on_status(self, raw: bytes, peer: str) -> bytes:
        return self._reporter.status(pb.StatusRequest.FromString(raw), peer).SerializeToString()

    def _on_rejected(self, kind: str, why: str, reason: str, peer: str) -> None:
        self._receiver.rejected(Reject(Status(kind), Why(why), reason), peer)

    def _on_found(self, address: str, node_id: str) -> None:
        if self._discovery is not None:
            self._discovery.on_found(address, node_id)

    def _on_count(self, why: str) -> None:
        self._receiver.rejected_quietly(Why(why))

    def _on_donate(self, raw: bytes, peer: str, slot: int) -> bytes:
        request = pb.FetchRequest.FromString(raw)
        msg = self._receiver.request_donation(request, self.slots[slot], self._release)
        with self._lock:  # from here the slot is ours until the donation ends
            self._held[slot] = msg
            self._donating[slot] = False
        msg.ready()
        return self._receiver.donation_header(msg).SerializeToString()

    def _on_donating_last(self, slot: int) -> None:
        with self._lock:
            self._donating[slot] = True

    def _on_donated(self, slot: int, done: bool) -> None:
        with self._lock:
            self._donating.pop(slot, None)
            msg = self._held[slot]
        if not done:  # back to our inbox: the slot is released when it is merged
            self._receiver.donation_ended(msg, False)
        else:
            self._receiver.donation_ended(msg, True)  # releases the slot

    def _release(self, buf: torch.Tensor) -> None:
        """A committed message or a donation is done with its slot (any thread)."""
        slot = self._slot_index[buf.data_ptr()]
        with self._lock:
            self._held.pop(slot, None)
            self._committing.discard(slot)
            if self._dead:
                if self._receiver.intake is not None:  # adopted: the node receives itself
                    self._receiver.intake.pool.release(buf)
                return  # still being adopted: free, since no longer held
        self.tell("release", slot)

    # --- the child's death ----------------------------------------------------------------------

    def _watch(self) -> None:
        self._proc.wait()
        if self._closing:
            return
        assert self._remote is not None
        self._remote.fall_back()  # at once: our port must answer ResolvePush again
        self._lost_child("it exited")
        if self._discovery is not None:
            self._discovery.fall_back()
        for t in self._threads:
            t.join()  # every request it made is answered (or its answer failed) before we look
        # and every commit it posted: taken after the slots are adopted, one would share its
        # slot with a message received here
        self._take_commits(wait=True)
        from gosgd_p2p.state import BufferPool

        with self._lock:
            for slot, last in list(self._donating.items()):
                msg = self._held[slot]
                if last:  # its last chunk was out: the joiner may hold the weight
                    log.error(
                        "the network process died as it sent a donation's last chunk: its "
                        "weight %.6g is written off (lost, never counted twice)",
                        msg.weight,
                    )
                    self._receiver.written_off(msg.weight)
                    del self._held[slot]
                else:
                    self._receiver.donation_ended(msg, False)  # releases after the merge
            self._donating.clear()
            free = [t for i, t in enumerate(self.slots) if i not in self._held]
            pool = BufferPool(
                len(self.slots[0]), len(self.slots), buffers=free, lent=len(self._held)
            )
            self._receiver.adopt(pool)


class RemoteServer:
    """The GossipServer of a node whose network process serves gRPC (port, set_serving,
    stop); after the process dies, the in-process GossipServer that replaced it."""

    def __init__(
        self,
        owner: NetworkProcess,
        port: int,
        loopback_only: bool,
        listen_host: str,
        fallback: Callable[[str], GossipServer],
    ) -> None:
        self._owner = owner
        self.port = port
        self.loopback_only = loopback_only
        self._listen_host = listen_host
        self._fallback = fallback
        self._lock = threading.Lock()
        self._serving = False
        self._stopped = False
        self._local: GossipServer | None = None

    @property
    def local(self) -> GossipServer | None:
        """The server in this process, once the network process is gone."""
        return self._local

    def set_serving(self, serving: bool) -> None:
        with self._lock:
            self._serving = serving
            if self._local is not None:
                self._local.set_serving(serving)
                return
        self._owner.tell("serving", serving)

    def stop(self, grace: float = 5.0) -> None:
        with self._lock:
            self._stopped = True
            local = self._local
        if local is not None:
            local.stop(grace)
            return
        if self._owner.tell("stop", grace):
            # not under the control lock: a call that ends meanwhile may release a slot
            control = self._owner._control
            try:
                control.settimeout(grace + 10.0)
                control.recv(RECORD_BYTES)  # "stopped", or the end of the child
            except OSError:
                pass

    def fall_back(self) -> None:
        """Serve from this process, on the same port (the network process is gone)."""
        with self._lock:
            if self._stopped:
                return
            host = self._listen_host
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            try:
                self._local = self._fallback(f"{host}:{self.port}")
            except OSError as err:
                log.error("cannot serve gRPC from this process either: %s", err)
                return
            self._local.set_serving(self._serving)
        log.error("gRPC is now served from this process, on port %d", self.port)


class RemoteDiscovery:
    """The node's mDNS discovery, run by its network process; once that process is gone, an
    MdnsDiscovery in this process with the same arguments. Found peers come back as requests
    to `on_found`."""

    def __init__(
        self,
        owner: NetworkProcess,
        args: tuple[str, str, int, tuple[str, int]],
        on_found: Callable[[str, str], None],
        interface: str | None,
    ) -> None:
        self._owner = owner
        self._args = args
        self.on_found = on_found
        self._interface = interface
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._local: MdnsDiscovery | None = None

    def start(self) -> None:
        with self._lock:
            self._started = True
        if not self._owner.tell("mdns", (*self._args, self._interface)):
            self.fall_back()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            local = self._local
        if local is not None:
            local.close()
        else:
            self._owner.tell("mdns_close", None)

    def fall_back(self) -> None:
        """Run discovery in this process (the network process is gone)."""
        with self._lock:
            if not self._started or self._closed or self._local is not None:
                return
            self._local = MdnsDiscovery(*self._args, self.on_found, self._interface)
            self._local.start()
        log.error("mDNS now runs in this process")


# --- the child -------------------------------------------------------------------------------


class _Slots:
    """Receive slots by index (the child's; thread-safe): those the node does not hold."""

    def __init__(self, free: list[int]) -> None:
        self._free = list(free)
        self._cv = threading.Condition()

    def acquire(self, wait_s: float = 0.0) -> int | None:
        with self._cv:
            if not self._free:
                self._cv.wait(wait_s)
            return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        with self._cv:
            self._free.append(slot)
            self._cv.notify()


class _Bridge:
    """The child's Receiving, Meeting and Reporting: each call is the front half here and a
    request to the training process (gRPC server threads)."""

    def __init__(self, spec: dict[str, Any], views: list[memoryview]) -> None:
        server = spec["server"]
        self._views = views
        self._callers: queue.Queue[tuple[int, socket.socket]] = queue.Queue()
        for i, fd in enumerate(spec["callers"]):
            self._callers.put((i, socket.socket(fileno=fd)))
        self._commits = socket.socket(fileno=spec["commits"])
        self._board = _Board(mmap.mmap(spec["board"], _Board.NBYTES))
        self._post_lock = threading.Lock()
        self._chunk_bytes = server["chunk_bytes"]
        #: Whether the node accepts pushes (its health status; it decides at commit anyway).
        self.serving = False
        expectation = Expectation(
            server["cluster"],
            bytes.fromhex(server["fingerprint"]),
            server["numel"],
            server["max_weight"],
        )
        self.slots = _Slots(list(range(len(views))))
        self.intake: Intake[int] = Intake(
            expectation,
            server["inbox_size"],
            self.slots,
            views.__getitem__,
            self._commit,
            lambda why: self._call("count", why.value),
        )

    def _call(self, kind: str, *args: Any, post: bool = False) -> Any:
        """Ask the training process; with `post`, for its training thread to answer at its
        next step, or an answer thread after POLL_WAIT_S (a commit)."""
        caller, conn = self._callers.get()
        try:
            stepping = time.monotonic() - self._board.polled[0] < POLL_WAIT_S
            if post and stepping:
                with self._post_lock:
                    self._commits.send(pickle.dumps((caller, kind, *args)))
                    self._board.posted[0] += 1
                conn.settimeout(POLL_WAIT_S)
                try:
                    answer = conn.recv(CALL_BYTES)
                except TimeoutError:  # not stepping: an answer thread takes it
                    conn.settimeout(None)
                    conn.send(pickle.dumps(("take",)))
                    answer = conn.recv(CALL_BYTES)
                finally:
                    conn.settimeout(None)
            else:
                conn.send(pickle.dumps((kind, *args)))
                answer = conn.recv(CALL_BYTES)
        except OSError:
            answer = b""
        finally:
            self._callers.put((caller, conn))
        if not answer:
            os._exit(0)  # the node is gone: so are we
        outcome, *rest = pickle.loads(answer)
        if outcome == "reject":
            raise Reject(Status(rest[0]), Why(rest[1]), rest[2])
        if outcome == "error":
            raise RuntimeError(rest[0])
        return rest[0]

    def receive_push(
        self,
        chunks: Iterator[Chunk],
        peer: str,
        active: Callable[[], bool],
        cancel: Callable[[], object],
    ) -> pb.PushAck:
        return self.intake.receive(chunks, peer, active, cancel, self._precheck)

    def _precheck(self, header: pb.StateHeader) -> pb.PushAck | None:
        if not self.serving:
            raise Reject(Status.PRECONDITION, Why.DRAINING, "node is not accepting pushes")
        return None

    def _commit(
        self, header: pb.StateHeader, slot: int, active: Callable[[], bool]
    ) -> tuple[pb.PushAck, bool]:
        payload = self._views[slot][: header.payload_bytes]
        # checked here, so that the training process's GIL is not held for it
        if header.encoding == pb.ENCODING_FP32 and not float32_finite(payload):
            raise Reject(Status.INVALID, Why.NOT_FINITE, "state has NaN or Inf values")
        if not active():
            raise Reject(Status.INVALID, Why.ABORTED, "the call failed before the message ended")
        # a float32 commit costs the same for any model, where decoding another encoding
        # costs with its size: that runs on an answer thread, in torch kernels without the GIL
        fp32 = header.encoding == pb.ENCODING_FP32
        ack, committed = self._call("commit", header.SerializeToString(), slot, post=fp32)
        return pb.PushAck.FromString(ack), committed

    def donate_state(self, request: pb.FetchRequest, peer: str) -> Iterator[bytes]:
        slot = self.slots.acquire()
        if slot is None:
            raise Reject(Status.EXHAUSTED, Why.DONATION_BUSY, "no receive buffer free to donate")
        try:
            header_bytes = self._call("donate", request.SerializeToString(), peer, slot)
        except BaseException:
            self.slots.release(slot)  # the node never took it
            raise
        # from here the slot is the node's: it releases it when the donation is settled
        header = pb.StateHeader.FromString(header_bytes)
        done = False
        try:
            payload = self._views[slot][: header.payload_bytes]
            chunks = split_for_streaming(header, payload, self._chunk_bytes)
            last = next(chunks)
            for chunk in chunks:
                yield last
                last = chunk
            self._call("donating_last", slot)  # were we to die now, the weight is written off
            yield last
            done = True
        finally:
            self._call("donated", slot, done)

    def resolve_push(self, request: pb.ResolveRequest, peer: str) -> pb.ResolveReply:
        return pb.ResolveReply.FromString(self._call("resolve", request.SerializeToString(), peer))

    def hello(self, request: pb.HelloRequest, peer: str) -> pb.HelloReply:
        return pb.HelloReply.FromString(self._call("hello", request.SerializeToString(), peer))

    def status(self, request: pb.StatusRequest, peer: str) -> pb.StatusReply:
        return pb.StatusReply.FromString(self._call("status", request.SerializeToString(), peer))

    def rejected(self, reject: Reject, peer: str) -> None:
        self._call("rejected", reject.kind.value, reject.counter.value, reject.reason, peer)

    def found(self, address: str, node_id: str) -> None:
        """mDNS found a node of the cluster (zeroconf's threads)."""
        self._call("found", address, node_id)


def main() -> None:
    spec = json.loads(sys.argv[1])
    control, credentials, client, send_views = start_child(spec)
    for fd in spec["calls"]:
        threading.Thread(
            target=serve_requests,
            args=(socket.socket(fileno=fd), client, send_views, CALL_BYTES),
            name="gosgd-call",
            daemon=True,
        ).start()
    views = [memoryview(mmap.mmap(fd, spec["slot_bytes"])) for fd in spec["slots"]]
    bridge = _Bridge(spec, views)
    control.send(b"ready")
    server: GossipServer | None = None
    discovery: MdnsDiscovery | None = None
    while True:
        try:
            request = control.recv(RECORD_BYTES)
        except OSError:
            request = b""
        if not request:
            break  # the node closed us, or died
        kind, arg = pickle.loads(request)
        if kind == "forget":
            client.forget(arg)
        elif kind == "release":
            bridge.slots.release(arg)
        elif kind == "serving":
            bridge.serving = arg
            if server is not None:
                server.set_serving(arg)
        elif kind == "serve":
            s = spec["server"]
            try:
                server = GossipServer(
                    bridge, bridge, s["listen"], s["workers"], credentials,
                    s["receive_timeout_s"], insecure=s["insecure"], reporting=bridge,
                )  # fmt: skip
                control.send(pickle.dumps(("serving", server.port, server.loopback_only)))
            except OSError as err:
                control.send(pickle.dumps(("error", str(err))))
        elif kind == "mdns":
            node_id, cluster, protocol_version, address, interface = arg
            discovery = MdnsDiscovery(
                node_id, cluster, protocol_version, address, bridge.found, interface
            )
            discovery.start()
        elif kind == "mdns_close":
            if discovery is not None:
                discovery.close()
                discovery = None
        elif kind == "stop":
            if server is not None:
                server.stop(arg)
                server = None
            control.send(b"stopped")
    if discovery is not None:  # the goodbye: peers stop finding us
        discovery.close()
    client.close()  # fails the pushes still running; the node settles them
    os._exit(0)  # without waiting for daemon threads blocked in gRPC calls


if __name__ == "__main__":
    main()
