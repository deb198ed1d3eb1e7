"""Chunk encoding and reassembly in gosgd_p2p.wire, checked against protobuf itself."""

from __future__ import annotations

import math
import zlib
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gosgd_p2p import wire
from gosgd_p2p.reject import Reject
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import (
    ENCODINGS,
    MAX_NAME_BYTES,
    MAX_WEIGHT,
    PROTOCOL_VERSION,
    WEIGHT_QUANTUM,
    Chunk,
    Expectation,
    assemble,
    check_header,
    decode_chunk,
    encode_chunk,
    first_header,
    join_message,
    split_for_streaming,
    split_message,
)

FINGERPRINT = bytes(range(16))
SMALL = 7  # chunk size that makes several chunks out of a few bytes

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
crcs = st.one_of(st.none(), u32, st.just(0))
payloads = st.binary(max_size=64)

headers = st.builds(
    pb.StateHeader,
    sender_id=st.text(max_size=20),
    message_id=u64,
    weight=st.floats(allow_nan=False),
    fingerprint=st.binary(max_size=16),
    encoding=st.sampled_from([pb.ENCODING_UNSPECIFIED, *ENCODINGS.values()]),
    payload_bytes=u64,
    sender_step=u64,
    cluster=st.text(max_size=10),
    protocol_version=u32,
    sender_address=st.text(max_size=10),
)


def _header(payload_bytes: int, **overrides) -> pb.StateHeader:
    fields = dict(
        sender_id="node-a",
        message_id=42,
        weight=0.5,
        fingerprint=FINGERPRINT,
        encoding=pb.ENCODING_FP32,
        payload_bytes=payload_bytes,
        sender_step=7,
        cluster="test",
        protocol_version=PROTOCOL_VERSION,
        sender_address="127.0.0.1:1",
    )
    fields.update(overrides)
    return pb.StateHeader(**fields)


def _pb_chunk(header=None, offset=0, data=b"", crc32=None) -> bytes:
    msg = pb.StateChunk(offset=offset, data=data)
    if header is not None:
        msg.header.CopyFrom(header)
    if crc32 is not None:
        msg.crc32 = crc32
    return msg.SerializeToString()


# --- encode_chunk / decode_chunk against protobuf ---------------------------------------------


@settings(max_examples=200, deadline=None)
@given(offset=u64, data=payloads, crc=crcs)
def test_data_chunks_encode_like_protobuf(offset: int, data: bytes, crc: int | None) -> None:
    raw = encode_chunk(Chunk(offset=offset, data=memoryview(data), crc32=crc))
    assert raw == _pb_chunk(offset=offset, data=data, crc32=crc)


@pytest.mark.parametrize(
    ("offset", "data", "crc"),
    [(0, b"abc", None), (0, b"abc", 0), (5, b"x" * 300, 123), (2**63, b"", 2**32 - 1), (0, b"", 0)],
)
def test_data_chunk_examples_encode_like_protobuf(offset: int, data: bytes, crc) -> None:
    assert encode_chunk(Chunk(offset=offset, data=memoryview(data), crc32=crc)) == _pb_chunk(
        offset=offset, data=data, crc32=crc
    )


@pytest.mark.parametrize("size", [(64 << 10) - 1, 64 << 10, 1 << 20, (4 << 20) + 3])
@pytest.mark.parametrize("source", ["bytes", "readonly_view", "tensor_view"])
def test_large_chunks_assembled_outside_the_gil_encode_like_protobuf(size, source) -> None:
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator())
    raw = data.numpy().tobytes()
    view = {
        "bytes": raw,
        "readonly_view": memoryview(raw),
        "tensor_view": memoryview(data.numpy()),
    }[source]
    encoded = encode_chunk(Chunk(offset=1 << 20, data=view, crc32=zlib.crc32(raw)))
    assert type(encoded) is bytes
    assert encoded == _pb_chunk(offset=1 << 20, data=raw, crc32=zlib.crc32(raw))
    data.zero_()  # the encoded chunk is a copy, not a view of the source
    assert encoded == _pb_chunk(offset=1 << 20, data=raw, crc32=zlib.crc32(raw))


@settings(max_examples=100, deadline=None)
@given(header=headers)
def test_header_chunks_encode_like_protobuf(header: pb.StateHeader) -> None:
    raw = encode_chunk(Chunk(header=header))
    assert raw == _pb_chunk(header=header)
    assert decode_chunk(raw).header == header


def test_empty_header_is_still_present() -> None:
    raw = encode_chunk(Chunk(header=pb.StateHeader()))
    assert raw == _pb_chunk(header=pb.StateHeader()) == b"\x0a\x00"
    assert decode_chunk(raw).header == pb.StateHeader()
    assert decode_chunk(b"").header is None


@settings(max_examples=200, deadline=None)
@given(header=st.one_of(st.none(), headers), offset=u64, data=payloads, crc=crcs)
def test_decode_reads_protobuf_chunks(header, offset: int, data: bytes, crc) -> None:
    chunk = decode_chunk(_pb_chunk(header, offset, data, crc))
    assert chunk.header == header
    assert chunk.offset == offset
    assert isinstance(chunk.data, memoryview)
    assert bytes(chunk.data) == data
    assert chunk.crc32 == crc


def test_decode_does_not_copy_the_data() -> None:
    raw = bytearray(_pb_chunk(offset=3, data=b"hello"))
    chunk = decode_chunk(raw)
    raw[-1] = ord("!")
    assert bytes(chunk.data) == b"hell!"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


UNKNOWN_FIELDS = [
    _varint(15 << 3 | 0) + _varint(2**40),  # varint
    _varint(16 << 3 | 1) + b"\x01" * 8,  # fixed64
    _varint(17 << 3 | 2) + _varint(3) + b"xyz",  # length-delimited
    _varint(18 << 3 | 5) + b"\x02" * 4,  # fixed32
    _varint(1000 << 3 | 2) + _varint(0),  # two-byte key
]


@settings(max_examples=100, deadline=None)
@given(
    offset=u64,
    data=payloads,
    crc=crcs,
    extra=st.lists(st.sampled_from(UNKNOWN_FIELDS), max_size=4),
    where=st.integers(0, 3),
)
def test_decode_skips_unknown_fields(offset, data, crc, extra, where) -> None:
    # Unknown fields before, between or after the known ones (each known field serialized alone).
    parts = [
        _pb_chunk(offset=offset),
        _pb_chunk(data=data),
        _pb_chunk(crc32=crc),
    ]
    parts.insert(where, b"".join(extra))
    raw = b"".join(parts)
    parsed = pb.StateChunk.FromString(raw)  # protobuf agrees this is a valid chunk
    chunk = decode_chunk(raw)
    assert (chunk.offset, bytes(chunk.data)) == (parsed.offset, parsed.data) == (offset, data)
    assert chunk.crc32 == crc
    assert chunk.header is None


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    raw=st.one_of(
        st.binary(max_size=80),
        st.builds(
            lambda prefix, tail: prefix + tail,
            st.sampled_from(
                [
                    b"\x0a",
                    b"\x0a\x05",
                    b"\x12",
                    b"\x1a\x10",
                    b"\x20",
                    b"\x0a\x03\x0a\x05",
                    _pb_chunk(header=_header(3)),
                    _pb_chunk(offset=9, data=b"abc", crc32=7),
                ]
            ),
            st.binary(max_size=20),
        ),
    )
)
def test_decode_raises_only_reject_on_garbage(raw: bytes) -> None:
    try:
        chunk = decode_chunk(raw)
    except Reject as err:
        assert err.kind == "invalid"
        assert err.counter in {"malformed_chunk", "malformed_header"}
        return
    assert isinstance(chunk, Chunk)
    assert chunk.crc32 is None or 0 <= chunk.crc32 <= 0xFFFFFFFF


def test_decode_rejects_every_cut_inside_a_field() -> None:
    header = _header(3)
    for raw in [
        _pb_chunk(offset=300, data=b"abcdef", crc32=0xDEADBEEF),
        _pb_chunk(header=header),
    ]:
        # field boundaries: where protobuf's own parse of the prefix is a complete message
        boundaries = {0, len(raw)}
        if raw[0] != 0x0A:
            boundaries |= {3, 3 + 2 + 6}
        for cut in range(len(raw)):
            if cut in boundaries:
                decode_chunk(raw[:cut])
            else:
                with pytest.raises(Reject) as err:
                    decode_chunk(raw[:cut])
                assert err.value.kind == "invalid"


@pytest.mark.parametrize(
    "raw",
    [
        b"\x10" + b"\xff" * 10 + b"\x01",  # varint longer than 64 bits
        b"\x20" + _varint(2**32),  # crc32 wider than 32 bits
        b"\x0b",  # start group
        b"\x0c",  # end group
        b"\x0e",  # wire type 6
        b"\x0f",  # wire type 7
        b"\x11" + b"\x00" * 7,  # fixed64 cut short
        b"\x15" + b"\x00" * 3,  # fixed32 cut short
        b"\x1a" + _varint(2**62) + b"x",  # length far past the end
        b"\x0a\x02\x0a\xff",  # header that protobuf cannot parse
        b"\x0a\x03\x0a\x01\xff",  # header with a sender id that is not UTF-8
    ],
)
def test_decode_rejects_malformed_chunks(raw: bytes) -> None:
    with pytest.raises(Reject) as err:
        decode_chunk(raw)
    assert err.value.kind == "invalid"


# --- split_for_streaming / first_header / assemble --------------------------------------------


def _stream(payload: bytes, chunk_bytes: int = SMALL) -> tuple[pb.StateHeader, list[Chunk]]:
    header = _header(len(payload))
    raws = list(split_for_streaming(header, memoryview(payload), chunk_bytes))
    chunks = [decode_chunk(r) for r in raws]
    return first_header(iter(chunks)), chunks[1:]


def _receive(payload_bytes: int, chunks, max_chunk_bytes: int = SMALL) -> bytes:
    out = bytearray(b"\xee" * payload_bytes)
    assemble(_header(payload_bytes), chunks, memoryview(out), max_chunk_bytes)
    return bytes(out)


@pytest.mark.parametrize("size", [0, 1, 3, SMALL - 1, SMALL, SMALL + 1, 3 * SMALL, 3 * SMALL + 2])
def test_split_and_assemble_round_trip(size: int) -> None:
    payload = bytes((i * 37 + 11) % 256 for i in range(size))
    header = _header(size)
    raws = list(split_for_streaming(header, memoryview(payload), SMALL))
    chunks = iter(decode_chunk(r) for r in raws)

    got_header = first_header(chunks)
    out = bytearray(size)
    assemble(got_header, chunks, memoryview(out), SMALL)

    assert got_header == header
    assert bytes(out) == payload
    data = [decode_chunk(r) for r in raws[1:]]
    assert len(data) == max(1, math.ceil(size / SMALL))
    assert [c.offset for c in data] == list(range(0, max(size, 1), SMALL))
    assert all(len(c.data) <= SMALL and c.header is None for c in data)
    assert [c.crc32 for c in data[:-1]] == [None] * (len(data) - 1)
    assert data[-1].crc32 == zlib.crc32(payload)


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=200), chunk_bytes=st.integers(1, 40))
def test_split_and_assemble_round_trip_any_size(payload: bytes, chunk_bytes: int) -> None:
    header, chunks = _stream(payload, chunk_bytes)
    assert header.payload_bytes == len(payload)
    assert _receive(len(payload), chunks, chunk_bytes) == payload


def test_round_trip_of_a_float32_buffer_at_the_default_chunk_size() -> None:
    src = torch.arange(wire.CHUNK_BYTES // 4 + 5, dtype=torch.float32)  # two chunks
    payload = memoryview(src.numpy()).cast("B")
    header = _header(len(payload))
    chunks = iter(decode_chunk(r) for r in split_for_streaming(header, payload))
    dst = torch.empty_like(src)
    assemble(first_header(chunks), chunks, memoryview(dst.numpy()).cast("B"))
    assert torch.equal(dst, src)


# --- join_message / split_message: one push in one StateMessage (PushMessage) ----------------


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=200), chunk_bytes=st.integers(1, 300))
def test_a_joined_message_is_protobufs_state_message(payload: bytes, chunk_bytes: int) -> None:
    raws = list(split_for_streaming(_header(len(payload)), memoryview(payload), chunk_bytes))
    joined = join_message(raws)
    reference = pb.StateMessage(chunks=[pb.StateChunk.FromString(r) for r in raws])
    assert joined == reference.SerializeToString()
    assert [bytes(v) for v in split_message(joined)] == raws
    # and what split_message yields reassembles into the payload
    chunks = iter(decode_chunk(v) for v in split_message(joined))
    assert first_header(chunks) == _header(len(payload))
    assert _receive(len(payload), chunks, chunk_bytes) == payload


def test_a_large_joined_message_is_built_outside_the_gil_and_still_exact() -> None:
    payload = memoryview(torch.randn(wire.CHUNK_BYTES // 4).numpy()).cast("B")
    raws = list(split_for_streaming(_header(len(payload)), payload))
    assert len(raws) == 2 and len(raws[1]) > wire._UNLOCKED_COPY_BYTES
    joined = join_message(raws)
    assert (
        joined
        == pb.StateMessage(chunks=[pb.StateChunk.FromString(r) for r in raws]).SerializeToString()
    )


def test_split_message_skips_unknown_fields() -> None:
    raws = list(split_for_streaming(_header(5), memoryview(b"abcde"), SMALL))
    unknown = bytes([2 << 3 | 0, 5, 3 << 3 | 5, 1, 2, 3, 4, 4 << 3 | 2, 2, 9, 9])
    assert [bytes(v) for v in split_message(unknown + join_message(raws) + unknown)] == raws


@pytest.mark.parametrize(
    "raw",
    [
        bytes([1 << 3 | 2, 10, 1, 2]),  # a chunk longer than what is left
        bytes([1 << 3 | 2, 0x80]),  # a truncated length
        bytes([1 << 3 | 3]),  # a group: not in this format
        bytes([2 << 3 | 1, 1, 2]),  # a fixed64 cut short
    ],
)
def test_split_message_rejects_malformed_messages(raw: bytes) -> None:
    with pytest.raises(Reject) as err:
        list(split_message(raw))
    assert err.value.kind == "invalid"


def test_split_refuses_a_payload_of_another_size() -> None:
    with pytest.raises(ValueError):
        list(split_for_streaming(_header(5), memoryview(b"abcd"), SMALL))


PAYLOAD = bytes(range(3 * SMALL - 1))  # chunks of 7, 7 and 6 bytes


@pytest.fixture
def chunks() -> list[Chunk]:
    return _stream(PAYLOAD)[1]


def _reject(chunk_list, max_chunk_bytes: int = SMALL) -> Reject:
    with pytest.raises(Reject) as err:
        _receive(len(PAYLOAD), chunk_list, max_chunk_bytes)
    return err.value


def test_the_reference_stream_is_accepted(chunks) -> None:
    assert len(chunks) == 3
    assert _receive(len(PAYLOAD), chunks) == PAYLOAD


def test_assemble_rejects_a_truncated_stream(chunks) -> None:
    err = _reject(chunks[:-1])
    assert (err.kind, err.counter) == ("invalid", "truncated")
    err = _reject([])
    assert (err.kind, err.counter) == ("invalid", "truncated")


def test_assemble_rejects_an_early_checksum(chunks) -> None:
    early = replace(chunks[0], crc32=zlib.crc32(chunks[0].data))
    err = _reject([early])
    assert (err.kind, err.counter) == ("invalid", "truncated")


@pytest.mark.parametrize(
    "order",
    [(1, 0, 2), (0, 2, 1), (0, 0, 1, 2), (0, 1, 1, 2), (0, 2), (1, 2)],
    ids=["swap-first", "swap-last", "dup-first", "dup-middle", "gap", "no-start"],
)
def test_assemble_rejects_reordered_duplicated_or_missing_chunks(chunks, order) -> None:
    err = _reject([chunks[i] for i in order])
    assert (err.kind, err.counter) == ("invalid", "offset")


def test_assemble_rejects_chunks_after_the_last(chunks) -> None:
    err = _reject([*chunks, chunks[-1]])
    assert (err.kind, err.counter) == ("invalid", "after_end")
    err = _reject([*chunks, Chunk(offset=len(PAYLOAD), data=memoryview(b"x"))])
    assert (err.kind, err.counter) == ("invalid", "after_end")


def test_assemble_rejects_bytes_beyond_the_payload(chunks) -> None:
    last = chunks[-1]
    longer = Chunk(offset=last.offset, data=memoryview(bytes(last.data) + b"!"), crc32=last.crc32)
    err = _reject([*chunks[:-1], longer])
    assert (err.kind, err.counter) == ("invalid", "payload_size")
    open_last = replace(last, crc32=None)
    extra = Chunk(offset=len(PAYLOAD), data=memoryview(b"!"), crc32=0)
    err = _reject([*chunks[:-1], open_last, extra])
    assert (err.kind, err.counter) == ("invalid", "payload_size")


def test_assemble_rejects_a_second_header(chunks) -> None:
    err = _reject([chunks[0], Chunk(header=_header(len(PAYLOAD))), *chunks[1:]])
    assert (err.kind, err.counter) == ("invalid", "second_header")


def test_assemble_rejects_an_oversized_chunk(chunks) -> None:
    err = _reject(chunks, max_chunk_bytes=SMALL - 1)
    assert (err.kind, err.counter) == ("exhausted", "chunk_size")


def test_assemble_rejects_a_wrong_checksum(chunks) -> None:
    bad = replace(chunks[-1], crc32=chunks[-1].crc32 ^ 1)
    err = _reject([*chunks[:-1], bad])
    assert (err.kind, err.counter) == ("invalid", "checksum")
    flipped = bytearray(chunks[1].data)
    flipped[0] ^= 0xFF
    err = _reject([chunks[0], replace(chunks[1], data=memoryview(bytes(flipped))), chunks[2]])
    assert (err.kind, err.counter) == ("invalid", "checksum")


def test_assemble_refuses_an_output_of_another_size(chunks) -> None:
    with pytest.raises(ValueError):
        assemble(_header(len(PAYLOAD)), chunks, memoryview(bytearray(len(PAYLOAD) + 1)))


@settings(max_examples=150, deadline=None)
@given(order=st.lists(st.integers(0, 2), max_size=6))
def test_assemble_accepts_only_the_exact_sequence(order: list[int]) -> None:
    chunk_list = _stream(PAYLOAD)[1]
    picked = [chunk_list[i] for i in order]
    if order == [0, 1, 2]:
        assert _receive(len(PAYLOAD), picked) == PAYLOAD
    else:
        with pytest.raises(Reject):
            _receive(len(PAYLOAD), picked)


def test_first_header_requires_a_header_alone() -> None:
    with pytest.raises(Reject) as err:
        first_header(iter([]))
    assert (err.value.kind, err.value.counter) == ("invalid", "empty_stream")
    for bad in [
        Chunk(offset=0, data=memoryview(b"x")),
        Chunk(header=_header(1), data=memoryview(b"x")),
        Chunk(header=_header(1), offset=4),
    ]:
        with pytest.raises(Reject) as err:
            first_header(iter([bad]))
        assert (err.value.kind, err.value.counter) == ("invalid", "no_header")


# --- check_header -----------------------------------------------------------------------------

EXPECT = Expectation(cluster="test", fingerprint=FINGERPRINT, numel=16)


def test_a_matching_header_passes() -> None:
    check_header(_header(64), EXPECT)
    for encoding, size in ((pb.ENCODING_BF16, 32), (pb.ENCODING_FP16, 32)):
        check_header(_header(size, encoding=encoding), EXPECT)
    check_header(_header(8 + 16, encoding=pb.ENCODING_INT8_BLOCK), EXPECT)  # one block
    check_header(_header(64, weight=MAX_WEIGHT), EXPECT)
    check_header(_header(64, weight=WEIGHT_QUANTUM), EXPECT)  # the smallest
    check_header(_header(64, sender_id="é" * (MAX_NAME_BYTES // 2)), EXPECT)


@pytest.mark.parametrize(
    ("overrides", "kind", "counter"),
    [
        ({"protocol_version": PROTOCOL_VERSION + 1}, "precondition", "protocol_version"),
        ({"protocol_version": 0}, "precondition", "protocol_version"),
        ({"cluster": "other"}, "precondition", "cluster"),
        ({"cluster": ""}, "precondition", "cluster"),
        ({"fingerprint": bytes(16)}, "precondition", "fingerprint"),
        ({"fingerprint": FINGERPRINT[:8]}, "precondition", "fingerprint"),
        ({"encoding": pb.ENCODING_UNSPECIFIED}, "invalid", "encoding"),
        ({"encoding": 7}, "invalid", "encoding"),
        ({"payload_bytes": 63}, "invalid", "payload_size"),
        ({"payload_bytes": 2**64 - 1}, "invalid", "payload_size"),
        ({"encoding": pb.ENCODING_BF16}, "invalid", "payload_size"),  # fp32's size
        ({"encoding": pb.ENCODING_FP16, "payload_bytes": 33}, "invalid", "payload_size"),
        ({"encoding": pb.ENCODING_INT8_BLOCK, "payload_bytes": 16}, "invalid", "payload_size"),
        ({"weight": math.nan}, "invalid", "weight"),
        ({"weight": math.inf}, "invalid", "weight"),
        ({"weight": -math.inf}, "invalid", "weight"),
        ({"weight": 0.0}, "invalid", "weight"),
        ({"weight": -0.0}, "invalid", "weight"),
        ({"weight": -0.5}, "invalid", "weight"),
        ({"weight": MAX_WEIGHT * (1 + 1e-15)}, "invalid", "weight"),
        ({"weight": 0.1}, "invalid", "weight"),  # off the grid: its sums would round
        ({"weight": WEIGHT_QUANTUM / 2}, "invalid", "weight"),
        ({"weight": 5e-324}, "invalid", "weight"),
        ({"sender_id": ""}, "invalid", "sender_id"),
        ({"sender_id": "x" * (MAX_NAME_BYTES + 1)}, "invalid", "sender_id"),
        ({"sender_id": "é" * (MAX_NAME_BYTES // 2 + 1)}, "invalid", "sender_id"),  # bytes count
    ],
)
def test_check_header_rejects(overrides: dict, kind: str, counter: str) -> None:
    with pytest.raises(Reject) as err:
        check_header(_header(**{"payload_bytes": 64, **overrides}), EXPECT)
    assert (err.value.kind, err.value.counter) == (kind, counter)
    assert err.value.reason == str(err.value)


def test_assemble_rejects_empty_data_chunks() -> None:
    """A peer cannot hold a stream open forever with empty chunks."""
    payload = memoryview(bytes(range(10)))
    header = pb.StateHeader(payload_bytes=len(payload))
    chunks = [Chunk(offset=0, data=b""), Chunk(offset=0, data=payload, crc32=zlib.crc32(payload))]
    with pytest.raises(Reject) as info:
        assemble(header, iter(chunks), memoryview(bytearray(len(payload))))
    assert info.value.counter == "empty_chunk"
