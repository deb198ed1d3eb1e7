"""Hostile input against a live node: every malformed or forged call is refused with the right
gRPC status, nothing is committed, and the node keeps serving with its model and weight intact.

One real GossipNode per test (127.0.0.1, port 0, a cluster token, no mDNS) and raw gRPC calls:
PushState streams are built chunk by chunk with wire.encode_chunk, or are plain bytes, so the
server sees exactly what a hostile peer could send. The mutation fuzzer is seeded: a failure
names its case and reproduces.
"""

from __future__ import annotations

import math
import random
import socket
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gosgd_p2p import GossipNode, NodeConfig
from gosgd_p2p.codec import encode
from gosgd_p2p.security import TOKEN_METADATA_KEY
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import (
    ENCODINGS,
    INT8_BLOCK,
    INT8_PARAM_BYTES,
    MAX_CHUNK_BYTES,
    MAX_GRPC_MESSAGE_BYTES,
    MAX_NAME_BYTES,
    MAX_WEIGHT,
    PROTOCOL_VERSION,
    WEIGHT_QUANTUM,
    Chunk,
    encode_chunk,
    payload_bytes,
)

pytestmark = pytest.mark.nodes

SERVICE = "/gosgd_p2p.v1.Gossip/"
Metadata = tuple[tuple[str, str], ...]
#: Hostile PushState streams the mutation fuzzer sends (the acceptance criterion: >= 10,000).
FUZZ_CASES = 10_000
#: Concurrent client threads: enough to keep two cores busy, fewer than the node's inbox slots.
FUZZ_THREADS = 4
#: Deadline of every call, seconds: a hung server fails the case instead of the test run.
CALL_TIMEOUT_S = 10.0
#: Inbox slots of the fuzzed node; after the fuzz, this many valid pushes must all be accepted.
INBOX_SIZE = 8

OK = grpc.StatusCode.OK
INVALID = frozenset({grpc.StatusCode.INVALID_ARGUMENT})
PRECONDITION = frozenset({grpc.StatusCode.FAILED_PRECONDITION})
EXHAUSTED = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})
UNAUTHENTICATED = frozenset({grpc.StatusCode.UNAUTHENTICATED})
#: What random bytes in the header's place may get: most do not parse as a header (INVALID);
#: the rare one that does parses as another protocol version (FAILED_PRECONDITION).
GARBAGE = INVALID | PRECONDITION
REFUSALS = INVALID | PRECONDITION | EXHAUSTED


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2)
    )


def bitwise(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Byte views of copies of `tensors`: equal only when every bit is (NaN or -0.0 included)."""
    return [t.detach().clone().contiguous().view(torch.uint8) for t in tensors]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n >> 7 else 0))
        n >>= 7
        if not n:
            return bytes(out)


@dataclass
class Target:
    """A node under attack, a raw channel to it, and what it looked like before."""

    node: GossipNode
    token: str
    channel: grpc.Channel
    before: list[torch.Tensor]

    @property
    def auth(self) -> Metadata:
        return ((TOKEN_METADATA_KEY, self.token),)

    def push(self, chunks: list[bytes], metadata: Metadata | None) -> tuple[grpc.StatusCode, str]:
        """One raw PushState call: (status, details), OK when the node acknowledged."""
        call = self.channel.stream_unary(
            SERVICE + "PushState",
            request_serializer=None,
            response_deserializer=pb.PushAck.FromString,
        )
        try:
            call(iter(chunks), timeout=CALL_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        return OK, ""

    def unary(self, method: str, request: bytes, auth: bool = True) -> tuple[grpc.StatusCode, str]:
        """One raw unary call (Hello, ResolvePush) with undecoded request bytes."""
        call = self.channel.unary_unary(
            SERVICE + method, request_serializer=None, response_deserializer=None
        )
        try:
            call(request, timeout=CALL_TIMEOUT_S, metadata=self.auth if auth else None)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        return OK, ""

    def resolve(self, sender_id: str, message_id: int) -> int:
        """ResolvePush: the outcome the node reports for (sender_id, message_id)."""
        call = self.channel.unary_unary(
            SERVICE + "ResolvePush",
            request_serializer=pb.ResolveRequest.SerializeToString,
            response_deserializer=pb.ResolveReply.FromString,
        )
        request = pb.ResolveRequest(sender_id=sender_id, message_id=message_id)
        return call(request, timeout=CALL_TIMEOUT_S, metadata=self.auth).outcome

    def fetch(self, request: bytes, auth: bool = True) -> tuple[grpc.StatusCode, str]:
        """One raw FetchState call, drained: OK only if the node streamed its state."""
        call = self.channel.unary_stream(
            SERVICE + "FetchState", request_serializer=None, response_deserializer=None
        )
        try:
            for _ in call(request, timeout=CALL_TIMEOUT_S, metadata=self.auth if auth else None):
                pass
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
        return OK, ""

    def header(self, **fields: object) -> pb.StateHeader:
        """A header the node would accept, with `fields` overridden."""
        values: dict[str, object] = dict(
            sender_id="fuzzer",
            message_id=1,
            weight=0.5,
            fingerprint=self.node.layout.fingerprint,
            encoding=pb.ENCODING_FP32,
            payload_bytes=self.node.layout.nbytes,
            cluster=self.node.config.cluster,
            protocol_version=PROTOCOL_VERSION,
        )
        values.update(fields)
        return pb.StateHeader(**values)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    token = "fuzz-0f1e2d3c4b5a6978"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    config = NodeConfig(
        node_id="victim",
        cluster="fuzz",
        p=0.0,
        mdns=False,
        token_file=str(token_file),
        inbox_size=INBOX_SIZE,
        rpc_timeout_s=0.2,  # a valid FetchState waits this long for a training thread (none)
        hello_interval_s=60.0,  # no peers; keep the membership thread quiet
    )
    node = GossipNode(make_model(), config)
    channel = grpc.insecure_channel(node.address)  # no client-side size limit: we test the server's
    try:
        yield Target(node, token, channel, bitwise(node.state))
    finally:
        channel.close()
        node.close()


def assert_untouched_and_still_serving(t: Target) -> None:
    """Nothing was committed, and the node still takes valid pushes into every inbox slot."""
    node = t.node
    assert node.counters.get("pushes_received") == 0
    assert len(node.inbox) == 0
    assert node.weight == 1.0
    for x, x0 in zip(bitwise(node.state), t.before, strict=True):
        assert torch.equal(x, x0)
    payload = torch.arange(node.layout.numel, dtype=torch.float32).numpy().tobytes()
    for i in range(INBOX_SIZE):  # every receive buffer came back: a leak would refuse one
        header = t.header(sender_id="friend", message_id=i + 1, weight=0.25)
        assert t.push(frames(header, payload, 256), t.auth) == (OK, "")
        assert t.resolve("friend", i + 1) == pb.PUSH_OUTCOME_COMMITTED
    assert node.counters.get("pushes_received") == INBOX_SIZE
    assert node.finish() == 1.0 + 0.25 * INBOX_SIZE


# --- building streams -------------------------------------------------------------------------


def data_chunks(payload: bytes, size: int, crc: int | None = None) -> list[Chunk]:
    """The data chunks of `payload`, `size` bytes each; the last carries `crc` (default: true)."""
    out = [
        Chunk(offset=start, data=payload[start : start + size])
        for start in range(0, len(payload), size)
    ]
    out[-1] = replace(out[-1], crc32=zlib.crc32(payload) if crc is None else crc)
    return out


def frames(
    header: pb.StateHeader, payload: bytes, size: int, crc: int | None = None
) -> list[bytes]:
    """A whole message on the wire: the header chunk, then the data chunks."""
    return [encode_chunk(c) for c in [Chunk(header=header), *data_chunks(payload, size, crc)]]


@dataclass
class Case:
    """One hostile call: the stream, the statuses it may get, the counter it must bump."""

    mutation: str
    chunks: list[bytes]
    expected: frozenset[grpc.StatusCode]
    metadata: Metadata | None
    counter: str | None = None  # rejected_<counter> that must count this case, when it is one
    abort_first: tuple[str, int] | None = None  # (sender, id) to ResolvePush before pushing


class Fuzzer:
    """Seeded generator of hostile PushState streams, each one mutation of a valid message."""

    def __init__(self, t: Target, seed: int) -> None:
        self.t = t
        self.rng = random.Random(seed)
        numel = t.node.layout.numel
        state = torch.tensor([self.rng.gauss(0, 1) for _ in range(numel)], dtype=torch.float32)
        #: A valid payload of the state in each encoding; each case mutates one of them.
        self.payloads = {encoding: _encoded(encoding, state) for encoding in ENCODINGS.values()}
        self.payload = self.payloads[pb.ENCODING_FP32]
        self.nbytes = len(self.payload)
        self.int8_params = INT8_PARAM_BYTES * -(-numel // INT8_BLOCK)  # offsets and scales
        mutations: dict[str, tuple[float, Callable[[pb.StateHeader], Case]]] = {
            "truncate_tail": (4, self.truncate_tail),
            "drop_chunk": (3, self.drop_chunk),
            "reorder": (4, self.reorder),
            "shuffle": (2, self.shuffle),
            "duplicate": (4, self.duplicate),
            "shifted_offset": (3, self.shifted_offset),
            "oversized_chunk": (0.6, self.oversized_chunk),
            "oversized_message": (0.12, self.oversized_message),
            "wrong_fingerprint": (3, self.wrong_fingerprint),
            "wrong_cluster": (2, self.wrong_cluster),
            "wrong_protocol": (2, self.wrong_protocol),
            "bad_sender_id": (2, self.bad_sender_id),
            "bad_encoding": (2, self.bad_encoding),
            "bad_int8_scale": (3, self.bad_int8_scale),
            "wrong_payload_bytes": (2, self.wrong_payload_bytes),
            "bad_weight": (4, self.bad_weight),
            "not_finite": (4, self.not_finite),
            "wrong_crc": (3, self.wrong_crc),
            "crc_too_big": (1, self.crc_too_big),
            "bit_flip": (4, self.bit_flip),
            "garbage_chunk": (4, self.garbage_chunk),
            "garbage_insert": (3, self.garbage_insert),
            "garbage_stream": (3, self.garbage_stream),
            "cut_chunk": (3, self.cut_chunk),
            "malformed_field": (2, self.malformed_field),
            "invalid_utf8_header": (1, self.invalid_utf8_header),
            "no_token": (2, self.no_token),
            "wrong_token": (3, self.wrong_token),
            "header_only": (1, self.header_only),
            "empty_stream": (1, self.empty_stream),
            "no_header": (1, self.no_header),
            "second_header": (2, self.second_header),
            "header_with_data": (1, self.header_with_data),
            "extra_after_crc": (2, self.extra_after_crc),
            "early_crc": (2, self.early_crc),
            "missing_crc": (2, self.missing_crc),
            "extra_payload": (2, self.extra_payload),
            "empty_data_chunk": (2, self.empty_data_chunk),
            "replay_after_abort": (1, self.replay_after_abort),
        }
        self.names = list(mutations)
        self.builders = [mutations[n][1] for n in self.names]
        self.weights = [mutations[n][0] for n in self.names]

    def cases(self, n: int) -> list[Case]:
        out = []
        for i in range(n):
            k = self.rng.choices(range(len(self.names)), self.weights)[0]
            # every mutation of a message in any of the encodings a peer may send
            encoding = self.rng.choice(list(self.payloads))
            self.payload = self.payloads[encoding]
            self.nbytes = len(self.payload)
            header = self.t.header(
                message_id=i + 1,
                weight=self.rng.randrange(1, 2**32) * WEIGHT_QUANTUM,  # on the grid, in (0, 1)
                encoding=encoding,
                payload_bytes=self.nbytes,
            )
            case = self.builders[k](header)
            case.mutation = self.names[k]
            out.append(case)
        return out

    # helpers
    def size(self, min_chunks: int = 1) -> int:
        """A chunk size that splits the payload into at least `min_chunks` data chunks."""
        sizes = [
            s for s in (37, 64, 100, 256, 484, self.nbytes) if -(-self.nbytes // s) >= min_chunks
        ]
        return self.rng.choice(sizes)

    def valid(self, h: pb.StateHeader, min_chunks: int = 1) -> list[Chunk]:
        return [Chunk(header=h), *data_chunks(self.payload, self.size(min_chunks))]

    def case(
        self,
        chunks: list[Chunk | bytes],
        expected: frozenset[grpc.StatusCode] = INVALID,
        counter: str | None = None,
        *,
        token: bool = True,
        metadata: Metadata | None = None,
        abort_first: tuple[str, int] | None = None,
    ) -> Case:
        """A Case; cases() names its mutation. Unless `token`, the call carries `metadata`."""
        raw = [c if isinstance(c, bytes) else encode_chunk(c) for c in chunks]
        meta = self.t.auth if token else metadata
        return Case("", raw, expected, meta, counter, abort_first)

    def garbage(self, longest: int = 300) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, longest))

    def header_case(
        self, h: pb.StateHeader, expected: frozenset[grpc.StatusCode], counter: str
    ) -> Case:
        return self.case(self.valid(h), expected, counter)

    # stream shape
    def truncate_tail(self, h: pb.StateHeader) -> Case:
        chunks = self.valid(h)
        return self.case(chunks[: self.rng.randrange(len(chunks))])

    def drop_chunk(self, h: pb.StateHeader) -> Case:
        chunks = self.valid(h, min_chunks=2)
        del chunks[self.rng.randrange(1, len(chunks) - 1)]  # a data chunk before the last
        return self.case(chunks, counter="offset")

    def reorder(self, h: pb.StateHeader) -> Case:
        chunks = self.valid(h, min_chunks=2)
        i, j = self.rng.sample(range(len(chunks)), 2)
        chunks[i], chunks[j] = chunks[j], chunks[i]
        return self.case(chunks)

    def shuffle(self, h: pb.StateHeader) -> Case:
        chunks = self.valid(h, min_chunks=3)
        order = list(range(len(chunks)))
        while order == sorted(order):
            self.rng.shuffle(order)
        return self.case([chunks[k] for k in order])

    def duplicate(self, h: pb.StateHeader) -> Case:
        chunks = self.valid(h)
        copy = chunks[self.rng.randrange(len(chunks))]
        chunks.insert(self.rng.randint(1, len(chunks)), copy)
        return self.case(chunks)

    def shifted_offset(self, h: pb.StateHeader) -> Case:
        chunks = self.valid(h)
        i = self.rng.randrange(1, len(chunks))
        shift = self.rng.choice([-1, 1, 4, -4, self.rng.randint(1, 1 << 40)])
        offset = max(0, chunks[i].offset + shift)
        if offset == chunks[i].offset:
            offset += 1
        chunks[i] = replace(chunks[i], offset=offset)
        return self.case(chunks, counter="offset")

    def oversized_chunk(self, h: pb.StateHeader) -> Case:
        # larger than a chunk may be, yet within gRPC's message limit: the node's own check
        chunks = self.valid(h)
        i = self.rng.randrange(1, len(chunks))
        big = MAX_CHUNK_BYTES + self.rng.randint(1, 32 << 10)
        chunks[i] = replace(chunks[i], data=bytes(big))
        return self.case(chunks, EXHAUSTED, counter="chunk_size")

    def oversized_message(self, h: pb.StateHeader) -> Case:
        # beyond gRPC's receive limit, in place of a chunk the message still needs: gRPC refuses
        chunks: list[Chunk | bytes] = list(self.valid(h))
        i = self.rng.randrange(0, len(chunks))
        chunks[i] = self.rng.randbytes(64) * (
            (MAX_GRPC_MESSAGE_BYTES >> 6) + self.rng.randint(1, 8)
        )
        return self.case(chunks, EXHAUSTED)

    # header fields
    def wrong_fingerprint(self, h: pb.StateHeader) -> Case:
        fp = h.fingerprint
        wrong = self.rng.choice(
            [b"", fp[:-1], fp + b"\0", bytes(len(fp)), self.rng.randbytes(len(fp))]
        )
        if wrong == fp:
            wrong = bytes(b ^ 1 for b in fp)
        h.fingerprint = wrong
        return self.header_case(h, PRECONDITION, "fingerprint")

    def wrong_cluster(self, h: pb.StateHeader) -> Case:
        h.cluster = self.rng.choice(["", "Fuzz", "fuzz ", "fuzz\0", "x" * 500, "füzz", "gosgd"])
        return self.header_case(h, PRECONDITION, "cluster")

    def wrong_protocol(self, h: pb.StateHeader) -> Case:
        h.protocol_version = self.rng.choice([0, 2, 1 << 31, (1 << 32) - 1])
        return self.header_case(h, PRECONDITION, "protocol_version")

    def bad_sender_id(self, h: pb.StateHeader) -> Case:
        h.sender_id = self.rng.choice(["", "x" * (MAX_NAME_BYTES + 1), "é" * 65, "x" * 10_000])
        return self.header_case(h, INVALID, "sender_id")

    def bad_encoding(self, h: pb.StateHeader) -> Case:
        h.encoding = self.rng.choice([0, 5, 6, 1000, (1 << 31) - 1])
        return self.header_case(h, INVALID, "encoding")

    def bad_int8_scale(self, h: pb.StateHeader) -> Case:
        """An int8 message whose CRC matches but one block's offset or scale is hostile."""
        self.payload = self.payloads[pb.ENCODING_INT8_BLOCK]
        self.nbytes = len(self.payload)
        h.encoding, h.payload_bytes = pb.ENCODING_INT8_BLOCK, self.nbytes
        payload = bytearray(self.payload)
        block = self.rng.randrange(self.int8_params // INT8_PARAM_BYTES)
        offset, scale = self.rng.choice(
            [(math.nan, 0.01), (0.0, math.nan), (math.inf, 0.01), (-math.inf, 0.01),
             (0.0, math.inf), (0.0, -0.01), (0.0, -math.inf), (3e38, 1e37), (-1.0, 3e38)]
        )  # fmt: skip
        payload[8 * block : 8 * block + 8] = struct.pack("<ff", offset, scale)
        chunks = [Chunk(header=h), *data_chunks(bytes(payload), self.size())]  # crc matches
        return self.case(chunks, counter="scale")

    def wrong_payload_bytes(self, h: pb.StateHeader) -> Case:
        n = self.nbytes
        h.payload_bytes = self.rng.choice([0, 4, n - 4, n - 1, n + 1, n + 4, 2 * n, (1 << 64) - 1])
        return self.header_case(h, INVALID, "payload_size")

    def bad_weight(self, h: pb.StateHeader) -> Case:
        h.weight = self.rng.choice(
            [
                0.0,
                -0.0,
                -0.5,
                -1e-300,
                -5e-324,
                -math.inf,
                math.inf,
                math.nan,
                -math.nan,
                math.nextafter(MAX_WEIGHT, math.inf),
                MAX_WEIGHT * 10,
                1.7e308,
                0.1,  # off the weight grid
                WEIGHT_QUANTUM / 2,
            ]
        )
        return self.header_case(h, INVALID, "weight")

    # payload
    def not_finite(self, h: pb.StateHeader) -> Case:
        if h.encoding == pb.ENCODING_INT8_BLOCK:  # its bytes are codes, each one finite
            return self.bad_int8_scale(h)
        bits = self.rng.choice(
            [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F800000, 0xFF800000,
             0x7F800000 | self.rng.randint(1, (1 << 23) - 1)]
        )  # fmt: skip
        payload = bytearray(self.payload)
        at = 4 * self.rng.randrange(self.nbytes // 4)
        payload[at : at + 4] = struct.pack("<I", bits)  # one or two bf16 or fp16: not finite
        chunks = [Chunk(header=h), *data_chunks(bytes(payload), self.size())]  # crc matches
        return self.case(chunks, counter="not_finite")

    def wrong_crc(self, h: pb.StateHeader) -> Case:
        crc = zlib.crc32(self.payload) ^ self.rng.randint(1, (1 << 32) - 1)
        chunks = [Chunk(header=h), *data_chunks(self.payload, self.size(), crc)]
        return self.case(chunks, counter="checksum")

    def crc_too_big(self, h: pb.StateHeader) -> Case:
        crc = self.rng.choice([1 << 32, (1 << 64) - 1, zlib.crc32(self.payload) | 1 << 40])
        chunks = [Chunk(header=h), *data_chunks(self.payload, self.size(), crc)]
        return self.case(chunks, counter="malformed_chunk")

    def bit_flip(self, h: pb.StateHeader) -> Case:
        payload = bytearray(self.payload)
        for bit in self.rng.sample(range(8 * self.nbytes), self.rng.randint(1, 3)):
            payload[bit // 8] ^= 1 << (bit % 8)  # CRC-32 catches every 1 to 3 bit error
        crc = zlib.crc32(self.payload)
        chunks = [Chunk(header=h), *data_chunks(bytes(payload), self.size(), crc)]
        return self.case(chunks, counter="checksum")

    # malformed bytes
    def garbage_chunk(self, h: pb.StateHeader) -> Case:
        chunks: list[Chunk | bytes] = list(self.valid(h))
        i = self.rng.randrange(len(chunks))
        chunks[i] = self.garbage()
        return self.case(chunks, GARBAGE if i == 0 else INVALID)

    def garbage_insert(self, h: pb.StateHeader) -> Case:
        chunks: list[Chunk | bytes] = list(self.valid(h))
        i = self.rng.randint(0, len(chunks))
        chunks.insert(i, self.garbage())
        return self.case(chunks, GARBAGE if i == 0 else INVALID)

    def garbage_stream(self, h: pb.StateHeader) -> Case:
        chunks = [self.garbage(2000) for _ in range(self.rng.randint(1, 6))]
        return self.case(list(chunks), GARBAGE)

    def cut_chunk(self, h: pb.StateHeader) -> Case:
        chunks: list[Chunk | bytes] = list(self.valid(h))
        i = self.rng.randrange(len(chunks))
        raw = encode_chunk(chunks[i])  # type: ignore[arg-type]
        chunks[i] = raw[: self.rng.randrange(len(raw))]  # every proper prefix is malformed
        return self.case(chunks)

    def malformed_field(self, h: pb.StateHeader) -> Case:
        chunks: list[Chunk | bytes] = list(self.valid(h))
        i = self.rng.randrange(len(chunks))
        field = self.rng.randint(5, 1000) << 3
        tail = self.rng.choice(
            [
                varint(field | self.rng.choice([3, 4, 6, 7])),  # wire types protobuf never uses
                varint(field | 1) + bytes(self.rng.randrange(8)),  # fixed64 cut short
                varint(field | 5) + bytes(self.rng.randrange(4)),  # fixed32 cut short
                varint(field | 2) + varint(100) + bytes(self.rng.randrange(100)),  # length
                varint(field | 0) + b"\xff" * self.rng.randint(1, 12),  # varint never ends
                b"\x80" * self.rng.randint(11, 20) + b"\x01",  # key longer than 64 bits
            ]
        )
        chunks[i] = encode_chunk(chunks[i]) + tail  # type: ignore[arg-type]
        return self.case(chunks, counter="malformed_chunk")

    def invalid_utf8_header(self, h: pb.StateHeader) -> Case:
        which = self.rng.choice(["sender_id", "cluster"])
        marker = "@@@@"
        setattr(h, which, marker)
        bad = self.rng.choice([b"\xff\xfe\xfd\xfc", b"\xc0\x80\xc0\x80", b"\xed\xa0\x80\x41"])
        body = h.SerializeToString().replace(marker.encode(), bad, 1)
        first = bytes([(1 << 3) | 2]) + varint(len(body)) + body
        chunks = [first, *data_chunks(self.payload, self.size())]
        return self.case(chunks, counter="malformed_header")

    # token
    def no_token(self, h: pb.StateHeader) -> Case:
        meta = self.rng.choice([None, (("x-gosgd-tokn", self.t.token),), (("other", "x"),)])
        return self.case(self.valid(h), UNAUTHENTICATED, "token", token=False, metadata=meta)

    def wrong_token(self, h: pb.StateHeader) -> Case:
        token = self.t.token
        wrong = self.rng.choice(
            ["", token[:-1], token + "x", token.upper(), " " + token, self.rng.randbytes(8).hex()]
        )
        meta = ((TOKEN_METADATA_KEY, wrong),)
        return self.case(self.valid(h), UNAUTHENTICATED, "token", token=False, metadata=meta)

    # message structure
    def header_only(self, h: pb.StateHeader) -> Case:
        return self.case([Chunk(header=h)], counter="truncated")

    def empty_stream(self, h: pb.StateHeader) -> Case:
        return self.case([], counter="empty_stream")

    def no_header(self, h: pb.StateHeader) -> Case:
        return self.case(self.valid(h)[1:], counter="no_header")

    def second_header(self, h: pb.StateHeader) -> Case:
        chunks = self.valid(h)
        other = self.t.header(message_id=h.message_id + 1_000_000, weight=h.weight)
        chunks.insert(self.rng.randint(1, len(chunks)), Chunk(header=self.rng.choice([h, other])))
        return self.case(chunks)

    def header_with_data(self, h: pb.StateHeader) -> Case:
        chunks = self.valid(h)
        first = self.rng.choice(
            [Chunk(header=h, data=b"\0"), Chunk(header=h, offset=4), Chunk(header=h, data=b"x" * 4)]
        )
        return self.case([first, *chunks[1:]], counter="no_header")

    def extra_after_crc(self, h: pb.StateHeader) -> Case:
        chunks = self.valid(h)
        extra = self.rng.choice(
            [Chunk(offset=self.nbytes, data=b"\0" * 4), Chunk(offset=self.nbytes, crc32=0),
             chunks[-1]]
        )  # fmt: skip
        return self.case([*chunks, extra], counter="after_end")

    def early_crc(self, h: pb.StateHeader) -> Case:
        chunks = self.valid(h, min_chunks=2)
        i = self.rng.randrange(1, len(chunks) - 1)
        running = zlib.crc32(self.payload[: chunks[i].offset + len(chunks[i].data)])
        chunks[i] = replace(chunks[i], crc32=running)  # a correct crc, of a prefix
        return self.case(chunks, counter="after_end")

    def missing_crc(self, h: pb.StateHeader) -> Case:
        chunks = self.valid(h)
        chunks[-1] = replace(chunks[-1], crc32=None)
        return self.case(chunks, counter="truncated")

    def extra_payload(self, h: pb.StateHeader) -> Case:
        longer = self.payload + self.rng.randbytes(self.rng.choice([1, 4, 64]))
        chunks = [Chunk(header=h), *data_chunks(longer, self.size())]  # crc of what is sent
        return self.case(chunks, counter="payload_size")

    def empty_data_chunk(self, h: pb.StateHeader) -> Case:
        chunks = self.valid(h)
        i = self.rng.randint(1, len(chunks) - 1)  # before a data chunk: after the crc it is late
        chunks.insert(i, Chunk(offset=chunks[i].offset))
        return self.case(chunks, counter="empty_chunk")

    def replay_after_abort(self, h: pb.StateHeader) -> Case:
        # a valid message whose sender already asked for it back (ResolvePush -> ABORTED); one
        # sender each, since a node promises only a few aborts at a time per sender
        h.sender_id = f"fuzzer-aborted-{h.message_id}"
        key = (h.sender_id, h.message_id)
        return self.case(self.valid(h), PRECONDITION, "aborted", abort_first=key)


def run_case(t: Target, case: Case) -> tuple[grpc.StatusCode, str]:
    if case.abort_first is not None:
        assert t.resolve(*case.abort_first) == pb.PUSH_OUTCOME_ABORTED
    return t.push(case.chunks, case.metadata)


def _encoded(encoding: int, state: torch.Tensor) -> bytes:
    """`state` (float32) as a payload in `encoding`."""
    out = torch.empty(payload_bytes(encoding, state.numel()), dtype=torch.uint8)
    encode(encoding, state, out)
    return out.numpy().tobytes()


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ten_thousand_hostile_pushes_are_all_refused_with_the_right_status(target: Target) -> None:
    cases = Fuzzer(target, seed=20240611).cases(FUZZ_CASES)
    with ThreadPoolExecutor(FUZZ_THREADS, thread_name_prefix="fuzz") as pool:
        results = list(pool.map(lambda c: run_case(target, c), cases))

    sent = Counter(c.mutation for c in cases)
    print(
        f"\nfuzz: {len(cases)} hostile PushState streams, "
        f"{sum(code == OK for code, _ in results)} accepted; "
        + ", ".join(f"{name}={n}" for name, n in sorted(sent.items()))
    )
    assert len(cases) >= 10_000
    wrong = [
        f"#{i} {c.mutation}: got {code.name} ({details!r}), expected "
        + "/".join(sorted(s.name for s in c.expected))
        for i, (c, (code, details)) in enumerate(zip(cases, results, strict=True))
        if code not in c.expected
    ]
    assert not wrong, f"{len(wrong)} of {len(cases)} cases got the wrong status:\n" + "\n".join(
        wrong[:10]
    )

    # every refusal was counted, each under the reason its mutation provokes
    counts = target.node.counters.snapshot()
    rejected = sum(n for name, n in counts.items() if name.startswith("rejected_"))
    # a stream gRPC itself cut (oversized_message) may end the handler before a Reject
    assert len(cases) - sent["oversized_message"] <= rejected <= len(cases)
    need = Counter(c.counter for c in cases if c.counter is not None)
    short = {k: (counts.get(f"rejected_{k}", 0), n) for k, n in need.items()}
    short = {k: v for k, v in short.items() if v[0] < v[1]}
    assert not short, f"rejection counters below their cases (counted, cases): {short}"
    assert counts.get("rejected_token", 0) == need["token"]
    assert counts.get("resolved_aborted", 0) == sent["replay_after_abort"]
    assert_untouched_and_still_serving(target)


@pytest.mark.timeout(120)
def test_arbitrary_chunk_streams_are_refused(target: Target) -> None:
    """Hypothesis: any list of byte strings, raw or chunk-shaped, is refused; none commits."""
    nbytes = target.node.layout.nbytes
    fp = target.node.layout.fingerprint
    header_like = st.builds(
        lambda **fields: encode_chunk(Chunk(header=target.header(**fields))),
        weight=st.one_of(st.just(0.5), st.floats()),
        cluster=st.sampled_from(["fuzz", "other", ""]),
        fingerprint=st.sampled_from([fp, b"", fp[:8]]),
        encoding=st.sampled_from(list(ENCODINGS.values())),
        payload_bytes=st.sampled_from([nbytes, nbytes // 2, 0, nbytes + 4]),
        protocol_version=st.sampled_from([PROTOCOL_VERSION, 0, 2]),
    )
    chunk_like = st.builds(
        lambda offset, data, crc: encode_chunk(Chunk(offset=offset, data=data, crc32=crc)),
        st.one_of(st.integers(0, nbytes + 8), st.integers(0, 2**64 - 1)),
        st.binary(max_size=nbytes + 8),
        st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    )
    any_chunk = st.one_of(header_like, chunk_like, st.binary(max_size=400))
    seen: Counter[str] = Counter()

    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(chunks=st.lists(any_chunk, max_size=8))
    def refused(chunks: list[bytes]) -> None:
        code, details = target.push(chunks, target.auth)
        seen[code.name] += 1
        assert code in REFUSALS, f"{code.name}: {details}"

    refused()
    print(f"\nhypothesis: {sum(seen.values())} streams, statuses {dict(seen)}")
    assert sum(seen.values()) >= 300
    assert_untouched_and_still_serving(target)


@pytest.mark.timeout(120)
def test_hostile_fetch_hello_and_resolve_calls_change_nothing(target: Target) -> None:
    rng = random.Random(7)
    node = target.node
    fp = node.layout.fingerprint
    failures: list[str] = []

    def expect(what: str, got: tuple[grpc.StatusCode, str], allowed: set[grpc.StatusCode]) -> None:
        if got[0] not in allowed:
            failures.append(f"{what}: got {got[0].name} ({got[1]!r})")

    # FetchState from another cluster, model or protocol: refused before anything is queued
    wrong_fetches = [
        pb.FetchRequest(node_id="j", cluster="other", fingerprint=fp, protocol_version=1),
        pb.FetchRequest(node_id="j", cluster="fuzz", fingerprint=b"", protocol_version=1),
        pb.FetchRequest(node_id="j", cluster="fuzz", fingerprint=fp[::-1], protocol_version=1),
        pb.FetchRequest(node_id="j", cluster="fuzz", fingerprint=fp, protocol_version=0),
        pb.FetchRequest(node_id="j", cluster="fuzz", fingerprint=fp, protocol_version=2),
    ]
    for i in range(200):
        request = wrong_fetches[i % len(wrong_fetches)]
        expect(f"fetch {request}", target.fetch(request.SerializeToString()), PRECONDITION)
    valid = pb.FetchRequest(node_id="j", cluster="fuzz", fingerprint=fp, protocol_version=1)
    expect("fetch without token", target.fetch(valid.SerializeToString(), False), UNAUTHENTICATED)
    # garbage requests: the node refuses them (INVALID_ARGUMENT); bytes that happen to parse
    # are a FetchRequest of another protocol version (FAILED_PRECONDITION)
    for _ in range(200):
        raw = rng.randbytes(rng.randint(1, 200))
        try:
            pb.FetchRequest.FromString(raw)
            allowed = set(PRECONDITION)
        except Exception:
            allowed = {grpc.StatusCode.INVALID_ARGUMENT}
        expect(f"fetch garbage {raw!r}", target.fetch(raw), allowed)
    # a well-formed request from a caller that is no joining node (no address answering Hello
    # as "j"): the node gives it nothing (FAILED_PRECONDITION)
    for _ in range(3):
        expect("fetch from a non-node", target.fetch(valid.SerializeToString()), PRECONDITION)

    # Hello with garbage: refused (INVALID_ARGUMENT), or (if it parses) answered harmlessly
    for _ in range(300):
        raw = rng.randbytes(rng.randint(1, 200))
        try:
            request = pb.HelloRequest.FromString(raw)
            assert request.cluster != "fuzz"
            allowed = {OK}
        except Exception:
            allowed = {grpc.StatusCode.INVALID_ARGUMENT}
        expect(f"hello garbage {raw!r}", target.unary("Hello", raw), allowed)
    hello = pb.HelloRequest(cluster="fuzz", protocol_version=PROTOCOL_VERSION).SerializeToString()
    expect("hello without token", target.unary("Hello", hello, auth=False), UNAUTHENTICATED)

    # ResolvePush for pushes that never came: ABORTED, or UNKNOWN once a sender's aborts fill
    # what the node may hold for it; never COMMITTED, and no weight moves
    for i in range(300):
        sender = rng.choice(["", "fuzzer", "victim", "x" * 1000, rng.randbytes(4).hex()])
        outcome = target.resolve(sender, rng.choice([0, i, (1 << 64) - 1 - i]))
        if outcome not in (pb.PUSH_OUTCOME_ABORTED, pb.PUSH_OUTCOME_UNKNOWN):
            failures.append(f"resolve {sender!r}: outcome {outcome}")
    for _ in range(100):
        raw = rng.randbytes(rng.randint(1, 100))
        try:
            pb.ResolveRequest.FromString(raw)
            allowed = {OK}
        except Exception:
            allowed = {grpc.StatusCode.INVALID_ARGUMENT}
        expect(f"resolve garbage {raw!r}", target.unary("ResolvePush", raw), allowed)
    raw = pb.ResolveRequest(sender_id="x", message_id=1).SerializeToString()
    expect("resolve without token", target.unary("ResolvePush", raw, False), UNAUTHENTICATED)

    assert not failures, f"{len(failures)} wrong answers:\n" + "\n".join(failures[:10])
    counts = node.counters.snapshot()
    assert counts.get("rejected_token", 0) == 3
    assert counts.get("rejected_malformed_request", 0) > 100  # counted, not a traceback
    assert counts.get("donations", 0) == 0
    assert node.peers.all() == []  # no Hello taught it a peer
    assert_untouched_and_still_serving(target)


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.mark.timeout(120)
def test_garbage_on_the_port_leaves_the_node_serving(target: Target) -> None:
    rng = random.Random(11)
    _, port = target.node.address.rsplit(":", 1)
    payloads = []
    for i in range(200):
        junk = rng.randbytes(rng.randint(1, 4096))
        payloads.append(
            [
                junk,
                HTTP2_PREFACE + junk,
                HTTP2_PREFACE + EMPTY_SETTINGS + junk,
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + junk,
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + junk,  # a TLS ClientHello start
            ][i % 5]
        )

    def attack(data: bytes) -> int | None:
        """Send `data`, half-close, read until the node hangs up: the bytes it answered (-1 for
        a reset, None if it kept the connection open past the deadline)."""
        with socket.create_connection(("127.0.0.1", int(port)), timeout=CALL_TIMEOUT_S) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                total = 0
                while chunk := s.recv(65536):
                    total += len(chunk)
                return total
            except TimeoutError:
                return None
            except OSError:  # a reset is a fine answer to garbage
                return -1

    with ThreadPoolExecutor(8, thread_name_prefix="garbage") as pool:
        answers = list(pool.map(attack, payloads))
    assert len(answers) == 200
    assert None not in answers, "the node left a garbage connection open"
    hello = pb.HelloRequest(cluster="other", protocol_version=PROTOCOL_VERSION)
    assert target.unary("Hello", hello.SerializeToString()) == (OK, "")
    assert target.node.counters.snapshot().get("rejected_token", 0) == 0
    assert_untouched_and_still_serving(target)


@pytest.mark.timeout(120)
def test_a_valid_message_followed_by_an_oversized_chunk(target: Target) -> None:
    """A complete, valid message, then a trailing message larger than gRPC's limit.

    gRPC refuses the trailing message (RESOURCE_EXHAUSTED), but its Python server first ends
    the request stream as if the client had half-closed, and cancels the call only a moment
    later. The node checks that the call is alive before committing and takes the message
    back out of the inbox if the call died meanwhile; that shrinks the window but cannot close
    it (measured: a few of 20 still commit). What must hold regardless: only the complete,
    valid message can ever be committed, each at most once, and the node keeps serving. An
    honest PeerClient never sends a trailing message, so its pushes never meet this case; a
    token holder who does gains nothing it could not do with a plain valid push.
    """
    payload = torch.zeros(target.node.layout.numel).numpy().tobytes()
    oversized = bytes(MAX_GRPC_MESSAGE_BYTES + 1)
    start = [t.clone() for t in target.node.state]
    got = []
    for i in range(20):
        header = target.header(message_id=i + 1, weight=0.5)
        got.append(target.push([*frames(header, payload, 256), oversized], target.auth))
    codes = Counter(code.name for code, _ in got)
    assert set(codes) == {"RESOURCE_EXHAUSTED"}, codes
    node = target.node
    committed = node.counters.get("pushes_received")
    print(f"valid message + oversized trailer: {committed} of 20 committed in the race")
    assert committed == len(node.inbox) <= 20
    fates = [node.inbox.fate("fuzzer", i + 1) for i in range(20)]
    assert fates.count("committed") == committed  # the rest were refused or taken back
    # what was committed is exactly the valid message (zeros) with its weight
    assert node.finish() == 1.0 + 0.5 * committed
    shrink = 1.0 / (1.0 + 0.5 * committed)  # lerps towards the all-zero message
    for x, x0 in zip(node.state, start, strict=True):
        torch.testing.assert_close(x, x0 * shrink)
