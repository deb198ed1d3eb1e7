"""State messages on the wire: chunking and reassembly as pure functions, and the size limits.

A message is a header chunk, then data chunks of at most MAX_CHUNK_BYTES (each sender chooses
its size, CHUNK_BYTES by default), the last one carrying the CRC-32 of the payload
(protos/gosgd_p2p/v1/gossip.proto). Data chunks are encoded and decoded here by hand,
byte-compatible with protobuf's StateChunk: building a protobuf message copies its `bytes` field
on construction, serialization and parsing, and on a 1 MiB chunk those copies cost a large share
of the throughput. The wire form of a bytes field is a tag, a varint length and the bytes, so
one copy writes a chunk and a memoryview reads it. Large copies are made outside the GIL
(_join, _copy_into), so that the sender and server threads do not stall the training thread.
"""

from __future__ import annotations

import ctypes
import math
import platform
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from gosgd_p2p.reject import Reject, Status, Why
from gosgd_p2p.v1 import gossip_pb2 as pb

try:  # ISA-L: the same CRC-32 as zlib, with carry-less multiplies (docs/benchmarks.md)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - a platform without an isal wheel
    from zlib import crc32

__all__ = [
    "CHUNK_BYTES",
    "ENCODINGS",
    "INT8_BLOCK",
    "MAX_CHUNK_BYTES",
    "MAX_GRPC_MESSAGE_BYTES",
    "MAX_WEIGHT",
    "WEIGHT_LIMIT",
    "WEIGHT_QUANTUM",
    "PROTOCOL_VERSION",
    "Chunk",
    "Expectation",
    "assemble",
    "buffer_address",
    "decode_chunk",
    "encode_chunk",
    "grpc_options",
    "join_message",
    "on_grid",
    "payload_bytes",
    "split_for_streaming",
    "split_message",
]

#: Wire protocol version spoken by this code (protos/gosgd_p2p/v1).
PROTOCOL_VERSION = 1
#: Payload bytes per data chunk a sender uses unless configured (NodeConfig.chunk_bytes).
CHUNK_BYTES = 1 << 20
#: Largest data chunk a receiver accepts, whatever the sender chose.
MAX_CHUNK_BYTES = 4 << 20
#: Largest gRPC message either end accepts: one chunk plus its framing and a header.
MAX_GRPC_MESSAGE_BYTES = MAX_CHUNK_BYTES + (64 << 10)
#: Largest weight a message may carry. Founders start at 1.0 and weights only halve or add,
#: so a legitimate weight never comes near this; a huge one would swamp every model it meets.
MAX_WEIGHT = 1e6
#: Every weight a node sends is a whole number of quanta. The founders' weights (1.0 each) are
#: too, so every weight in the cluster is, and as long as a weight stays below WEIGHT_LIMIT
#: (2^21 * 2^32 quanta = 2^53, the float64 significand) every sum and difference of weights
#: is exact: a merge a + a_s never rounds, so the total is conserved bit for bit, not only to
#: an ulp per merge. Plain float halving does round: after about a hundred pushes among four
#: nodes, a sum of merged halves needs more than 53 bits.
WEIGHT_QUANTUM = 2.0**-32
#: Weights up to this add exactly on WEIGHT_QUANTUM's grid.
WEIGHT_LIMIT = 2.0**21
#: Longest node id or cluster name accepted, in bytes.
MAX_NAME_BYTES = 128

#: The wire encodings by name (NodeConfig.encoding, --encoding): the proto enum value of each.
#: gosgd_p2p.codec encodes and decodes them.
ENCODINGS: dict[str, pb.Encoding] = {
    "fp32": pb.ENCODING_FP32,
    "bf16": pb.ENCODING_BF16,
    "fp16": pb.ENCODING_FP16,
    "int8": pb.ENCODING_INT8_BLOCK,
}
#: Elements per block of ENCODING_INT8_BLOCK (each block has its own offset and scale).
INT8_BLOCK = 4096
#: Bytes of one int8 block's (offset, scale): two float32.
INT8_PARAM_BYTES = 8


def on_grid(a: float) -> bool:
    """Whether `a` is a whole number of WEIGHT_QUANTUM below WEIGHT_LIMIT: a weight that adds
    exactly (gosgd_p2p.algorithm splits on this grid; a message's weight must lie on it)."""
    return 0.0 <= a < WEIGHT_LIMIT and (a / WEIGHT_QUANTUM).is_integer()


def payload_bytes(encoding: int, numel: int) -> int:
    """Bytes of a payload of `numel` elements in `encoding` (a proto Encoding value).

    Raises Reject(Status.INVALID, Why.ENCODING) for an encoding this node does not know.
    """
    if encoding == pb.ENCODING_FP32:
        return 4 * numel
    if encoding in (pb.ENCODING_BF16, pb.ENCODING_FP16):
        return 2 * numel
    if encoding == pb.ENCODING_INT8_BLOCK:
        return INT8_PARAM_BYTES * -(-numel // INT8_BLOCK) + numel
    raise Reject(Status.INVALID, Why.ENCODING, f"unsupported encoding {encoding}")


def receive_numel(numel: int) -> int:
    """Float32 elements of a receive buffer for a state of `numel`: room for its payload in
    any encoding (a tiny state's int8 payload, with its block parameters, may be larger)."""
    largest = max(payload_bytes(encoding, numel) for encoding in ENCODINGS.values())
    return max(numel, -(-largest // 4))


def grpc_options() -> list[tuple[str, int]]:
    """Channel and server options that every gosgd gRPC endpoint uses (one place for limits)."""
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
        # Keepalive finds a dead peer in the middle of a long stream.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


# --- chunk encoding ---------------------------------------------------------------------------

_TAG_HEADER = (1 << 3) | 2  # field 1, length-delimited
_TAG_OFFSET = (2 << 3) | 0  # field 2, varint
_TAG_DATA = (3 << 3) | 2  # field 3, length-delimited
_TAG_CRC = (4 << 3) | 0  # field 4, varint


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise Reject(Status.INVALID, Why.MALFORMED_CHUNK, "truncated varint in chunk")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise Reject(Status.INVALID, Why.MALFORMED_CHUNK, "varint longer than 64 bits in chunk")


@dataclass(frozen=True)
class Chunk:
    """One decoded StateChunk: a header, or (offset, data) with an optional final crc32."""

    header: pb.StateHeader | None = None
    offset: int = 0
    data: bytes | memoryview = b""
    crc32: int | None = None


def encode_chunk(chunk: Chunk) -> bytes:
    """Serialize a chunk exactly as protobuf serializes the same StateChunk."""
    parts: list[bytes | memoryview] = []
    if chunk.header is not None:
        h = chunk.header.SerializeToString()
        parts += [bytes([_TAG_HEADER]), _varint(len(h)), h]
    if chunk.offset:
        parts += [bytes([_TAG_OFFSET]), _varint(chunk.offset)]
    if len(chunk.data):
        parts += [bytes([_TAG_DATA]), _varint(len(chunk.data)), chunk.data]
    if chunk.crc32 is not None:
        parts += [bytes([_TAG_CRC]), _varint(chunk.crc32)]
    return _join(parts)


#: Chunks at least this large are copied with the GIL released (see _join).
_UNLOCKED_COPY_BYTES = 64 << 10
_CPYTHON = platform.python_implementation() == "CPython"

if _CPYTHON:
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _bytes_address = ctypes.pythonapi.PyBytes_AsString
    _bytes_address.restype = ctypes.c_void_p
    _bytes_address.argtypes = (ctypes.py_object,)


def _join(parts: list[bytes | memoryview]) -> bytes:
    """b"".join(parts), with the copy of a large chunk made outside the GIL.

    A sender thread copying 1 MiB under the GIL holds up the training thread for that long,
    once per chunk of every push. On CPython the bytes object is created
    uninitialised and filled by ctypes.memmove, which releases the GIL, before anyone else sees
    it (the C API's contract for PyBytes_FromStringAndSize(NULL, n)).
    """
    total = sum(len(part) for part in parts)
    if total < _UNLOCKED_COPY_BYTES or not _CPYTHON:
        return b"".join(parts)
    out: bytes = _new_bytes(None, total)
    at = _bytes_address(out)
    for part in parts:
        ctypes.memmove(at, buffer_address(part), len(part))
        at += len(part)
    return out


def _copy_into(out: memoryview, at: int, data: bytes | memoryview) -> None:
    """out[at : at + len(data)] = data, a large copy made outside the GIL (see _join)."""
    n = len(data)
    if n < _UNLOCKED_COPY_BYTES or not _CPYTHON:
        out[at : at + n] = data
        return
    if at < 0 or at + n > len(out) or out.readonly:
        raise ValueError("copy out of the output buffer's bounds")
    ctypes.memmove(buffer_address(out) + at, buffer_address(data), n)


def float32_finite(data: memoryview) -> bool:
    """True when no float32 in `data` (a whole number of them) is NaN or infinite.

    One min/max pass, as state.all_finite does with torch: NaN propagates into both and an
    infinity becomes an extreme. numpy, so the network process checks without torch.
    """
    values = np.frombuffer(data, dtype=np.float32)
    if values.size == 0:
        return True
    return bool(np.isfinite(values.min()) and np.isfinite(values.max()))


def buffer_address(buf: bytes | memoryview) -> int:
    """Address of the first byte of a contiguous buffer (kept alive by the caller)."""
    if isinstance(buf, bytes):
        return _bytes_address(buf)  # type: ignore[no-any-return]
    address: int = np.frombuffer(buf, np.uint8).ctypes.data
    return address


def decode_chunk(raw: bytes | memoryview) -> Chunk:
    """Parse a serialized StateChunk without copying its data (a view into `raw`).

    Raises Reject(Status.INVALID, ...) on malformed input. Unknown fields are skipped, as protobuf
    does, so a newer sender may add fields.
    """
    header = None
    offset = 0
    data: bytes | memoryview = memoryview(b"")
    crc = None
    for field, value in _fields(memoryview(raw), Why.MALFORMED_CHUNK, "chunk"):
        if isinstance(value, int):
            if field == 2:
                offset = value
            elif field == 4:
                if value > 0xFFFFFFFF:
                    raise Reject(Status.INVALID, Why.MALFORMED_CHUNK, "crc32 does not fit 32 bits")
                crc = value
        elif field == 1:
            try:
                header = pb.StateHeader.FromString(bytes(value))
            except Exception as err:  # protobuf raises DecodeError and friends
                raise Reject(Status.INVALID, Why.MALFORMED_HEADER, f"bad header: {err}") from None
        elif field == 3:
            data = value
    return Chunk(header=header, offset=offset, data=data, crc32=crc)


def _fields(buf: memoryview, counter: Why, what: str) -> Iterator[tuple[int, int | memoryview]]:
    """The varint and length-delimited fields of a serialized protobuf message, in order: (field
    number, value or view into `buf`). Fixed-width fields are skipped, as unknown ones; malformed
    input raises Reject(Status.INVALID, counter, ...) when it is reached."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            yield field, value
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            end = pos + length
            if end > len(buf):
                raise Reject(Status.INVALID, counter, f"field runs past the end of the {what}")
            yield field, buf[pos:end]
            pos = end
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > len(buf):
                raise Reject(Status.INVALID, counter, f"field runs past the end of the {what}")
        else:
            raise Reject(Status.INVALID, counter, f"unsupported wire type {wire_type}")


def split_for_streaming(
    header: pb.StateHeader, payload: memoryview, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """Serialized chunks of one message: the header, then the payload in order with its CRC.

    `payload` is a byte view of the flat buffer (header.payload_bytes long); it must not change
    while the generator runs. Yields wire bytes (pass them to gRPC without a serializer).
    """
    if len(payload) != header.payload_bytes:
        raise ValueError(f"payload is {len(payload)} bytes, header says {header.payload_bytes}")
    yield encode_chunk(Chunk(header=header))
    crc = 0
    total = len(payload)
    for start in range(0, total, chunk_bytes):
        piece = payload[start : start + chunk_bytes]
        crc = crc32(piece, crc)
        last = start + chunk_bytes >= total
        yield encode_chunk(Chunk(offset=start, data=piece, crc32=crc if last else None))
    if total == 0:
        yield encode_chunk(Chunk(crc32=0))


_CHUNKS_TAG = bytes([1 << 3 | 2])  # StateMessage.chunks: field 1, length-delimited


def join_message(chunks: Iterable[bytes]) -> bytes:
    """A serialized StateMessage holding these serialized chunks, in order (PushMessage).

    Byte-identical to protobuf's serialization of StateMessage(chunks=[...]).
    """
    parts: list[bytes | memoryview] = []
    for chunk in chunks:
        parts += [_CHUNKS_TAG, _varint(len(chunk)), chunk]
    return _join(parts)


def split_message(raw: bytes | memoryview) -> Iterator[memoryview]:
    """The serialized chunks of a serialized StateMessage, in order, as views into `raw`.

    Raises Reject(Status.INVALID, ...) when it reaches malformed input; unknown fields are skipped.
    """
    for field, value in _fields(memoryview(raw), Why.MALFORMED_MESSAGE, "message"):
        if field == 1 and isinstance(value, memoryview):
            yield value


# --- reassembly -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expectation:
    """What a receiver requires of a header before it reserves memory for the payload."""

    cluster: str
    fingerprint: bytes
    numel: int  # elements of the state: the payload's size follows from the encoding
    max_weight: float = MAX_WEIGHT  # the most weight one message may carry


def check_header(header: pb.StateHeader, expect: Expectation) -> None:
    """Raise Reject unless `header` describes a message this node may accept."""
    if header.protocol_version != PROTOCOL_VERSION:
        raise Reject(
            Status.PRECONDITION,
            Why.PROTOCOL_VERSION,
            f"protocol version {header.protocol_version}, this node speaks {PROTOCOL_VERSION}",
        )
    if header.cluster != expect.cluster:
        raise Reject(
            Status.PRECONDITION,
            Why.CLUSTER,
            f"cluster {header.cluster!r} is not {expect.cluster!r}",
        )
    if not header.sender_id or len(header.sender_id.encode()) > MAX_NAME_BYTES:
        raise Reject(Status.INVALID, Why.SENDER_ID, "sender id is empty or too long")
    if header.fingerprint != expect.fingerprint:
        raise Reject(
            Status.PRECONDITION, Why.FINGERPRINT, "model fingerprint differs: another model"
        )
    needed = payload_bytes(header.encoding, expect.numel)  # Reject for an unknown encoding
    if header.payload_bytes != needed:
        raise Reject(
            Status.INVALID,
            Why.PAYLOAD_SIZE,
            f"payload of {header.payload_bytes} bytes, the model in that encoding needs {needed}",
        )
    w = header.weight
    if not math.isfinite(w) or w <= 0.0 or w > expect.max_weight or not on_grid(w):
        raise Reject(
            Status.INVALID,
            Why.WEIGHT,
            f"weight {w!r} is not finite, > 0, <= {expect.max_weight:g} and a whole number of"
            f" {WEIGHT_QUANTUM!r}",
        )


def first_header(chunks: Iterator[Chunk]) -> pb.StateHeader:
    """Consume the first chunk of a message and return its header (Reject if there is none)."""
    first = next(chunks, None)
    if first is None:
        raise Reject(Status.INVALID, Why.EMPTY_STREAM, "stream ended before the header")
    if first.header is None or len(first.data) or first.offset:
        raise Reject(
            Status.INVALID, Why.NO_HEADER, "first chunk must carry the header and nothing else"
        )
    return first.header


def assemble(
    header: pb.StateHeader,
    chunks: Iterable[Chunk],
    out: memoryview,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> None:
    """Write the data chunks that follow `header` into `out` (payload_bytes long), checking them.

    Returns only when the whole payload arrived in order, without gaps, overlaps or extra
    bytes, and its CRC-32 matches; raises Reject otherwise. `out` then holds the payload.
    """
    total = header.payload_bytes
    if len(out) != total:
        raise ValueError("output buffer does not match the payload size")
    received = 0
    crc = 0
    final_crc: int | None = None
    for chunk in chunks:
        if final_crc is not None:
            raise Reject(
                Status.INVALID, Why.AFTER_END, "chunk after the one that carried the crc32"
            )
        if chunk.header is not None:
            raise Reject(Status.INVALID, Why.SECOND_HEADER, "a second header in one message")
        n = len(chunk.data)
        if n == 0 and total:
            raise Reject(Status.INVALID, Why.EMPTY_CHUNK, "data chunk without data")
        if n > max_chunk_bytes:
            raise Reject(
                Status.EXHAUSTED, Why.CHUNK_SIZE, f"chunk of {n} bytes > {max_chunk_bytes}"
            )
        if chunk.offset != received:
            raise Reject(
                Status.INVALID, Why.OFFSET, f"chunk at offset {chunk.offset}, expected {received}"
            )
        if received + n > total:
            raise Reject(
                Status.INVALID, Why.PAYLOAD_SIZE, "more payload bytes than the header declared"
            )
        _copy_into(out, received, chunk.data)
        crc = crc32(chunk.data, crc)
        received += n
        final_crc = chunk.crc32
    if final_crc is None:
        raise Reject(Status.INVALID, Why.TRUNCATED, f"stream ended at {received} of {total} bytes")
    if received != total:
        raise Reject(Status.INVALID, Why.TRUNCATED, f"crc32 after {received} of {total} bytes")
    if final_crc != crc:
        raise Reject(Status.INVALID, Why.CHECKSUM, "crc32 of the payload does not match")
