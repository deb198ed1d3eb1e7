"""The wire encodings (gosgd_p2p.codec): round trips within their documented bounds, the
extremes of each format, and hostile payloads refused before the output is written."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gosgd_p2p.codec import BF16_MAX, FP16_MAX, INT8_CLAMP, buffer_numel, decode, encode
from gosgd_p2p.reject import Reject
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import ENCODINGS, INT8_BLOCK, INT8_PARAM_BYTES, payload_bytes

pytestmark = pytest.mark.timeout(120)

FP32, BF16, FP16, INT8 = (ENCODINGS[n] for n in ("fp32", "bf16", "fp16", "int8"))
#: Odd sizes: one element, less than a block, a block and one, several blocks and a tail.
SIZES = (1, 2, 3, 7, 255, 4095, INT8_BLOCK, INT8_BLOCK + 1, 3 * INT8_BLOCK + 17)


def round_trip(encoding: int, x: torch.Tensor) -> torch.Tensor:
    wire = torch.empty(payload_bytes(encoding, x.numel()), dtype=torch.uint8)
    encode(encoding, x, wire)
    out = torch.full_like(x, math.nan)
    decode(encoding, wire, out)
    return out


def bound(encoding: int, x: torch.Tensor) -> torch.Tensor:
    """The documented bound on |decoded - x| for each element (codec's docstring)."""
    a = x.double().abs()
    if encoding == FP32:
        return torch.zeros_like(a)
    if encoding == BF16:
        return a * 2.0**-8 + 2.0**-134
    if encoding == FP16:
        return a * 2.0**-11 + 2.0**-25
    out = torch.empty_like(a)
    for start in range(0, x.numel(), INT8_BLOCK):
        block = x[start : start + INT8_BLOCK].double()
        scale = float((block.max() - block.min()) / 255)
        biggest = float(block.abs().max())
        out[start : start + INT8_BLOCK] = scale / 2 + 2.0**-21 * biggest + 2.0**-140
    return out


def assert_within_bound(encoding: int, x: torch.Tensor) -> None:
    y = round_trip(encoding, x)
    assert torch.isfinite(y).all()
    err = (y.double() - x.double()).abs()
    over = err > bound(encoding, x)
    assert not over.any(), (
        f"{int(over.sum())} of {x.numel()} elements beyond the bound, e.g. "
        f"x={float(x[over][0])!r} -> {float(y[over][0])!r}"
    )


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    encoding=st.sampled_from(list(ENCODINGS.values())),
    size=st.sampled_from(SIZES),
    kind=st.sampled_from(["normal", "constant", "zeros", "wide", "tiny", "mixed"]),
    magnitude=st.sampled_from([1e-30, 1e-6, 1.0, 1e3, 6e4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_encoding_round_trips_within_its_bound(
    encoding: int, size: int, kind: str, magnitude: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(size, generator=gen) * magnitude
    elif kind == "constant":
        x = torch.full((size,), magnitude)
    elif kind == "zeros":
        x = torch.zeros(size)
    elif kind == "wide":  # magnitudes spread over many orders within one block
        x = torch.randn(size, generator=gen) * torch.logspace(-20, 4, size)
    elif kind == "tiny":  # float32 subnormals
        x = torch.randn(size, generator=gen) * 1e-40
    else:  # a block of zeros beside one of large values: each block has its own scale
        x = torch.randn(size, generator=gen) * magnitude
        x[: size // 2] = 0.0
    if encoding == FP16:
        x = x.clamp(-FP16_MAX, FP16_MAX)  # beyond: clamped (test_fp16_clamps_...)
    assert_within_bound(encoding, x.float())


@pytest.mark.parametrize("encoding", list(ENCODINGS.values()))
def test_the_extremes_of_each_format_round_trip(encoding: int) -> None:
    tiny = torch.finfo(torch.float32).tiny
    limit = {FP32: 3.0e38, BF16: BF16_MAX, FP16: FP16_MAX, INT8: INT8_CLAMP}[encoding]
    for values in (
        [limit, -limit, 0.0, -0.0],
        [limit] * 5,
        [-limit, limit * 2.0**-20, 1.0],
        [tiny, -tiny, 1.4e-45, 0.0],
        [2.0**-24, 2.0**-14, 6.1e-5, 65504.0],  # fp16's smallest subnormal and normal, its max
    ):
        assert_within_bound(encoding, torch.tensor(values, dtype=torch.float32))


def test_fp16_clamps_out_of_range_values_and_never_sends_an_infinity() -> None:
    x = torch.tensor([7e4, -1e9, 3e38, math.inf, -math.inf, 1.0])
    y = round_trip(FP16, x)
    assert y.tolist() == [FP16_MAX, -FP16_MAX, FP16_MAX, FP16_MAX, -FP16_MAX, 1.0]


def test_bf16_clamps_what_would_round_to_an_infinity() -> None:
    x = torch.tensor([torch.finfo(torch.float32).max, -math.inf, 1.0])
    assert round_trip(BF16, x).tolist() == [BF16_MAX, -BF16_MAX, 1.0]


def test_int8_clamps_so_that_no_block_range_overflows() -> None:
    x = torch.tensor([torch.finfo(torch.float32).max, -math.inf, 0.0, 1.0])
    y = round_trip(INT8, x)
    assert torch.isfinite(y).all()
    assert y[0] == pytest.approx(INT8_CLAMP, rel=1e-6) and y[1] == pytest.approx(-INT8_CLAMP)


def test_a_nan_is_sent_as_such_and_left_to_the_receiver_to_refuse() -> None:
    """The sender does not hide a NaN: the receiver's finiteness (or scale) check refuses it."""
    x = torch.tensor([1.0, math.nan, 2.0])
    assert math.isnan(round_trip(BF16, x)[1]) and math.isnan(round_trip(FP16, x)[1])
    wire = torch.empty(payload_bytes(INT8, 3), dtype=torch.uint8)
    encode(INT8, x, wire)
    with pytest.raises(Reject) as err:
        decode(INT8, wire, torch.empty(3))
    assert err.value.counter.value == "scale"


def test_payload_sizes_and_send_buffer_sizes() -> None:
    assert payload_bytes(FP32, 10) == 40
    assert payload_bytes(BF16, 10) == payload_bytes(FP16, 10) == 20
    assert payload_bytes(INT8, INT8_BLOCK + 1) == 2 * INT8_PARAM_BYTES + INT8_BLOCK + 1
    assert buffer_numel(INT8, 1) == 3  # 9 bytes encoded: more than the fp32 state
    assert buffer_numel(INT8, 10_000) == 10_000
    with pytest.raises(Reject):
        payload_bytes(pb.ENCODING_UNSPECIFIED, 10)


def int8_wire(numel: int, offset: float, scale: float, block: int = 0) -> torch.Tensor:
    """A valid int8 payload of `numel` elements with block `block`'s parameters replaced."""
    wire = torch.empty(payload_bytes(INT8, numel), dtype=torch.uint8)
    encode(INT8, torch.linspace(-1, 1, numel), wire)
    raw = bytearray(wire.numpy().tobytes())
    raw[8 * block : 8 * block + 8] = struct.pack("<ff", offset, scale)
    return torch.frombuffer(raw, dtype=torch.uint8).clone()


@pytest.mark.parametrize(
    ("offset", "scale"),
    [
        (math.nan, 0.01),
        (0.0, math.nan),
        (math.inf, 0.0),
        (-math.inf, 0.01),
        (0.0, math.inf),
        (0.0, -1e-3),
        (0.0, -math.inf),
        (3e38, 1e37),  # offset + 255 * scale overflows float32
        (-1.0, 2e36),  # 255 * scale overflows float32
    ],
)
def test_hostile_int8_offsets_and_scales_are_refused_before_writing(
    offset: float, scale: float
) -> None:
    numel = 2 * INT8_BLOCK + 5
    for block in (0, 2):  # a full block and the short last one
        out = torch.full((numel,), 7.0)
        with pytest.raises(Reject) as err:
            decode(INT8, int8_wire(numel, offset, scale, block), out)
        assert (err.value.kind.value, err.value.counter.value) == ("invalid", "scale")
        assert (out == 7.0).all()


@pytest.mark.parametrize("encoding", list(ENCODINGS.values()))
def test_a_payload_of_the_wrong_length_is_refused(encoding: int) -> None:
    numel = 100
    out = torch.full((numel,), 7.0)
    for delta in (-1, 1, -2):
        wire = torch.zeros(payload_bytes(encoding, numel) + delta, dtype=torch.uint8)
        with pytest.raises(Reject) as err:
            decode(encoding, wire, out)
        assert err.value.counter.value == "payload_size"
    assert (out == 7.0).all()
