"""Pushes sent from a process of their own (NodeConfig.send_process, `--send-process`).

Why: gRPC's Python code runs under the GIL, which the sender threads share with the training
thread. For a small, fast model that is most of what gossip costs (bench/sender_placement
measures it; docs/benchmarks.md has the figures). With send_process the node's send buffers are
shared memory (memfd), and a push is a small request over a Unix socket to a child process,
which makes the gRPC call straight from that memory and answers with the ack or the failure.
The node's sender thread waits for the answer in a blocking read, which holds no GIL.
Everything else (the server, ResolvePush, membership, the inbox, the weight) stays in the node;
the child holds no weight and no state of its own.

Failures keep the weight exact. If the child dies while it makes a push, that push may or may
not have reached its receiver: it fails as "maybe delivered", and the node settles it with
ResolvePush, as any lost ack. A push the child never took certainly failed, and comes back.
Once the child is gone, pushes go from the node's own threads (the log says so once). When the
node's process dies, the child reads end-of-file and exits.

Run as `python -m gosgd_p2p.sendproc SPEC` by SendProcessClient only.
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
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from gosgd_p2p.client import PeerClient, PushFailed
from gosgd_p2p.security import Credentials
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import CHUNK_BYTES, buffer_address

if TYPE_CHECKING:
    import torch

__all__ = ["SendProcessClient"]

log = logging.getLogger(__name__)

#: Longest wait for the child to start (import grpc, map the buffers), seconds.
START_TIMEOUT_S = 60.0
#: A push answer may come this long after the push's own deadline before the child is
#: presumed hung (and killed), seconds.
ANSWER_MARGIN_S = 10.0
#: Largest control record (a request or an answer: a header, an address, an ack).
RECORD_BYTES = 1 << 16


class SendProcessClient(PeerClient):
    """A PeerClient whose pushes from its shared `buffers` are made by a child process.

    `buffers` are `count` flat float32 tensors of `nbytes` bytes in shared memory: the node's
    send pool. A push of the whole of one, or of its first bytes (an encoded snapshot), is
    made by the child. A push of any other memory, or once the child is gone, runs here as in
    PeerClient. Every other call (Hello, ResolvePush, FetchState) runs here: they are rare
    (a NetworkProcess, its subclass, has its child make the unary ones too).
    """

    #: What the log calls the child.
    WHAT = "send process"
    #: The module the child runs (`python -m MODULE SPEC`).
    CHILD = "gosgd_p2p.sendproc"

    def __init__(
        self,
        credentials: Credentials | None,
        nbytes: int,
        count: int,
        *,
        tune_malloc: bool = True,
        extra: dict[str, Any] | None = None,
        extra_fds: list[int] = [],  # noqa: B006 (read only)
    ) -> None:
        """`extra` joins the child's spec and `extra_fds` are passed to it (a subclass's)."""
        import torch  # here, not above: the child process never needs it

        if not hasattr(os, "memfd_create"):
            raise RuntimeError("send_process needs Linux (os.memfd_create); leave it off here")
        super().__init__(credentials)
        self.nbytes = nbytes
        self.buffers: list[torch.Tensor] = []
        memfds: list[int] = []
        ours: list[socket.socket] = []
        theirs: list[socket.socket] = []
        try:
            for i in range(count):
                fd = os.memfd_create(f"gosgd-send-{i}")
                memfds.append(fd)
                os.ftruncate(fd, nbytes)
                self.buffers.append(torch.frombuffer(mmap.mmap(fd, nbytes), dtype=torch.float32))
            # socket pairs: one for control (start, forget), then one per push that may run at
            # once (one per send buffer, and one for a leave)
            for _ in range(count + 2):
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                ours.append(a)
                theirs.append(b)
            spec = {
                "control": theirs[0].fileno(),
                "pushers": [s.fileno() for s in theirs[1:]],
                "buffers": memfds,
                "nbytes": nbytes,
                "tune_malloc": tune_malloc,
                "log_level": logging.getLogger("gosgd_p2p").getEffectiveLevel(),
                **(extra or {}),
            }
            env = dict(os.environ)
            package_root = str(Path(__file__).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
            self._proc = subprocess.Popen(
                [sys.executable, "-m", self.CHILD, json.dumps(spec)],
                pass_fds=[*memfds, *(s.fileno() for s in theirs), *extra_fds],
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            for fd in memfds:
                os.close(fd)  # the maps (ours) and the child's inherited copies keep them
            for s in theirs:
                s.close()
        self._control = ours[0]
        self._control_lock = threading.Lock()
        self._free: queue.Queue[socket.socket] = queue.Queue()
        for s in ours[1:]:
            self._free.put(s)
        self._sockets = ours
        self._index = {t.data_ptr(): i for i, t in enumerate(self.buffers)}
        self._dead = False
        self._dead_lock = threading.Lock()
        self._pinned: list[int] = []  # buffers page-locked for CUDA (pin_buffers)
        self._control.settimeout(START_TIMEOUT_S)
        try:
            self._control.send(pickle.dumps(credentials or Credentials()))
            ready = self._control.recv(RECORD_BYTES)
        except OSError:
            ready = b""
        if not ready.startswith(b"ready"):
            self._stop_child()
            raise RuntimeError(
                f"the {self.WHAT} did not start (exit code {self._proc.poll()}); "
                "see its error above"
            )
        #: What the child said after "ready" (a subclass's).
        self.ready_info = ready[len(b"ready") :]
        self._control.settimeout(None)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether pushes still go through the child."""
        return not self._dead

    def pin_buffers(self, buffers: list[torch.Tensor] | None = None, what: str = "send") -> None:
        """Page-lock the buffers (the send buffers, or `buffers`), so a snapshot's copy from a
        CUDA device into them runs asynchronously on its side stream; without it the copy
        would hold the training thread."""
        import torch

        try:
            cudart = torch.cuda.cudart()
            for buf in self.buffers if buffers is None else buffers:
                nbytes = buf.numel() * buf.element_size()
                error = int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0))
                if error != 0:
                    raise RuntimeError(f"cudaHostRegister: CUDA error {error}")
                self._pinned.append(buf.data_ptr())
        except Exception as err:  # slower copies, still correct ones
            log.warning("cannot page-lock the %s buffers (%s): copies will wait", what, err)

    def push(
        self,
        address: str,
        header: pb.StateHeader,
        payload: memoryview,
        timeout: float,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> pb.PushAck:
        """As PeerClient.push; made by the child when `payload` is one of `buffers`."""
        index = self._buffer_index(payload)
        if index is None or self._dead:
            return super().push(address, header, payload, timeout, chunk_bytes)
        length = payload.nbytes  # an encoded snapshot fills the start of its buffer
        request = ("push", address, header.SerializeToString(), index, length, timeout, chunk_bytes)
        conn = self._free.get()
        try:
            conn.settimeout(timeout + ANSWER_MARGIN_S)
            try:
                conn.send(pickle.dumps(request))
            except OSError as err:  # the child is gone and never took this push
                self._lost_child(f"cannot reach it: {err}")
                return super().push(address, header, payload, timeout, chunk_bytes)
            try:
                answer = conn.recv(RECORD_BYTES)
            except TimeoutError:
                self._lost_child("no answer past the push deadline; killed it")
                answer = b""
            except OSError as err:
                self._lost_child(str(err))
                answer = b""
        finally:
            self._free.put(conn)
        if not answer:
            self._lost_child("it exited during a push")
            raise PushFailed(grpc.StatusCode.UNKNOWN, f"the {self.WHAT} died during the push", True)
        kind, *rest = pickle.loads(answer)
        if kind == "ack":
            return pb.PushAck.FromString(rest[0])
        if kind == "failed":
            code_name, details, maybe = rest
            raise PushFailed(grpc.StatusCode[code_name], details, maybe)
        raise RuntimeError(f"the send process failed a push: {rest[0]}")

    def forget(self, address: str) -> None:
        super().forget(address)
        if not self._dead:
            try:
                with self._control_lock:
                    self._control.send(pickle.dumps(("forget", address)))
            except OSError as err:
                self._lost_child(str(err))

    def close(self) -> None:
        """Close every channel and stop the child (it finishes no push: call after the node's
        senders are done)."""
        super().close()
        self._stop_child()
        if self._pinned:
            import torch

            cudart = torch.cuda.cudart()
            for address in self._pinned:
                cudart.cudaHostUnregister(address)
            self._pinned.clear()

    def _buffer_index(self, payload: memoryview) -> int | None:
        """Which buffer `payload` is the start of (all of it, or its encoded first bytes)."""
        if payload.nbytes > self.nbytes or payload.nbytes == 0:
            return None
        return self._index.get(buffer_address(payload))

    def _lost_child(self, why: str) -> None:
        with self._dead_lock:
            if self._dead:
                return
            self._dead = True
        self._proc.kill()  # no-op when it already exited; ends a hung one
        code = self._proc.wait()
        log.error(
            "%s %d is gone (%s; exit code %s): pushes now go from this process",
            self.WHAT,
            self._proc.pid,
            why,
            code,
        )

    def _stop_child(self) -> None:
        self._dead = True
        for s in self._sockets:
            s.close()  # the child reads end-of-file and exits
        try:
            self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# --- the child -------------------------------------------------------------------------------


def serve_requests(
    conn: socket.socket,
    client: PeerClient,
    views: list[memoryview],
    record_bytes: int = RECORD_BYTES,
) -> None:
    """Make the pushes (and, for a network process, the unary calls) asked for on `conn`, one
    at a time, until the node closes it. Requests are at most `record_bytes`."""
    while True:
        try:
            request = conn.recv(record_bytes)
        except OSError:
            return
        if not request:
            return
        kind, *args = pickle.loads(request)
        answer = _call(client, *args) if kind == "call" else _push(client, views, *args)
        try:
            conn.send(pickle.dumps(answer))
        except OSError as err:
            if err.errno != errno.EMSGSIZE:
                return
            log.error("the answer to a %s is too large to pass on", kind)
            conn.send(pickle.dumps(("error", "answer too large")))


def _push(
    client: PeerClient,
    views: list[memoryview],
    address: str,
    header_bytes: bytes,
    index: int,
    length: int,
    timeout: float,
    chunk_bytes: int,
) -> tuple[Any, ...]:
    try:
        header = pb.StateHeader.FromString(header_bytes)
        ack = client.push(address, header, views[index][:length], timeout, chunk_bytes)
        return ("ack", ack.SerializeToString())
    except PushFailed as err:
        return ("failed", err.code.name, err.details, err.maybe_delivered)
    except Exception as err:  # reported to the node, which takes the weight back
        log.exception("push to %s failed unexpectedly", address)
        return ("error", f"{type(err).__name__}: {err}")


def _call(
    client: PeerClient, address: str, method: str, request: bytes, timeout: float
) -> tuple[Any, ...]:
    try:
        return ("reply", client.unary(address, method, request, timeout))
    except grpc.RpcError as err:
        return ("rpc_error", err.code().name, err.details() or "")  # type: ignore[attr-defined]
    except Exception as err:  # the node makes the call itself
        log.exception("%s to %s failed unexpectedly", method, address)
        return ("error", f"{type(err).__name__}: {err}")


def start_child(
    spec: dict[str, Any],
) -> tuple[socket.socket, Credentials, PeerClient, list[memoryview]]:
    """The child's start: logging, malloc, the credentials from the node, and the threads that
    make pushes. Returns the control socket, the credentials, the client and the send buffers."""
    logging.basicConfig(
        level=spec["log_level"],
        format=f"%(asctime)s {spec.get('log_name', 'gosgd-send')}[%(process)d] %(levelname)s "
        "%(name)s: %(message)s",
    )
    if spec["tune_malloc"]:
        from gosgd_p2p.malloc import tune_malloc

        tune_malloc()
    control = socket.socket(fileno=spec["control"])
    credentials = pickle.loads(control.recv(RECORD_BYTES))
    nbytes = spec["nbytes"]
    views = [memoryview(mmap.mmap(fd, nbytes)) for fd in spec["buffers"]]
    client = PeerClient(credentials)
    for fd in spec["pushers"]:
        conn = socket.socket(fileno=fd)
        threading.Thread(
            target=serve_requests, args=(conn, client, views), name="gosgd-push", daemon=True
        ).start()
    return control, credentials, client, views


def main() -> None:
    control, _, client, _ = start_child(json.loads(sys.argv[1]))
    control.send(b"ready")
    while True:
        try:
            request = control.recv(RECORD_BYTES)
        except OSError:
            request = b""
        if not request:
            break  # the node closed us, or died
        kind, address = pickle.loads(request)
        if kind == "forget":
            client.forget(address)
    client.close()  # fails the pushes still running; the node settles them
    os._exit(0)  # without waiting for daemon threads blocked in gRPC calls


if __name__ == "__main__":
    main()
