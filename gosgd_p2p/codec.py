"""Wire encodings of the flat float32 state: encode on the sender's device, decode on receipt.

Each node picks one encoding for its pushes (NodeConfig.encoding); a receiver decodes whatever
a peer sends into its float32 receive buffer and merges in float32. The weight a is never
encoded: it travels as an exact double in the header. The CRC-32 of a message covers the
encoded bytes, as they travel.

The encodings (protos/gosgd_p2p/v1/gossip.proto) and how far a decoded element x' may be from
the element x that was encoded (u: the unit roundoff of the format):
- fp32: 4 bytes an element, exact.
- bf16: 2 bytes, round to nearest even: |x' - x| <= 2^-8 |x| + 2^-134. Finite values beyond
  bfloat16's largest (about 3.39e38) are clamped to it, so an infinity is never sent.
- fp16: 2 bytes, round to nearest even: |x' - x| <= 2^-11 |x| + 2^-25 for |x| <= 65504. Larger
  values, infinities included, are clamped to +-65504 (the largest finite binary16), never sent
  as infinities; NaN stays NaN, which the receiver refuses as it does in fp32.
- int8: blocks of INT8_BLOCK elements (the last one shorter), each with an offset (its
  minimum) and a scale ((max - min) / 255) as float32, then one byte q per element, x' =
  offset + scale * q: |x' - x| <= scale / 2 + 2^-21 * max|x in the block| + 2^-140, about
  1/510 of the block's range. Elements beyond +-2^126 are clamped to it first, so that no
  block's range overflows float32 (a model that large has diverged anyway).

decode() checks what a peer can get wrong before the buffer is written: the payload's size,
and for int8 every offset and scale (finite, scale >= 0, offset + 255 * scale finite), so that
every decoded element is finite; it raises Reject otherwise. Both functions are pure: they
touch only their arguments.
"""

from __future__ import annotations

import torch

from gosgd_p2p.reject import Reject, Status, Why
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import INT8_BLOCK, INT8_PARAM_BYTES, payload_bytes

__all__ = ["BF16_MAX", "FP16_MAX", "INT8_CLAMP", "buffer_numel", "decode", "encode"]

#: Largest finite bfloat16 and binary16: what larger values are clamped to.
BF16_MAX = torch.finfo(torch.bfloat16).max
FP16_MAX = torch.finfo(torch.float16).max
#: int8 clamps elements to +-INT8_CLAMP: any block's range then fits in float32.
INT8_CLAMP = 2.0**126


def buffer_numel(encoding: int, numel: int) -> int:
    """float32 elements a host buffer needs to hold a state of `numel` elements in
    `encoding`: the state itself (float32) or its encoded bytes, whichever is larger."""
    return max(numel, -(-payload_bytes(encoding, numel) // 4))


@torch.no_grad()
def encode(encoding: int, flat: torch.Tensor, out: torch.Tensor) -> None:
    """Write the 1-D float32 state `flat` into the uint8 tensor `out` (on the same device,
    exactly payload_bytes(encoding, flat.numel()) long) in `encoding`.

    Runs where the tensors are: on a GPU as kernels queued on the current stream.
    """
    n = flat.numel()
    if out.dtype != torch.uint8 or out.numel() != payload_bytes(encoding, n):
        raise ValueError(f"output must be {payload_bytes(encoding, n)} bytes of uint8")
    if encoding == pb.ENCODING_FP32:
        out.view(torch.float32).copy_(flat)
    elif encoding == pb.ENCODING_BF16:
        narrow = out.view(torch.bfloat16)
        narrow.copy_(flat)  # an overflow rounds to an infinity, which the clamp takes back
        narrow.clamp_(-BF16_MAX, BF16_MAX)
    elif encoding == pb.ENCODING_FP16:
        narrow = out.view(torch.float16)
        narrow.copy_(flat)
        narrow.clamp_(-FP16_MAX, FP16_MAX)
    elif encoding == pb.ENCODING_INT8_BLOCK:
        _encode_int8(flat, out)
    else:
        raise ValueError(f"unknown encoding {encoding}")


def _encode_int8(flat: torch.Tensor, out: torch.Tensor) -> None:
    n = flat.numel()
    blocks = -(-n // INT8_BLOCK)
    params = out[: blocks * INT8_PARAM_BYTES].view(torch.float32).view(blocks, 2)
    codes = out[blocks * INT8_PARAM_BYTES :]
    # clamped, no block's range (max - min <= 2^127) overflows float32: all in float32, in place
    values = flat.clamp(-INT8_CLAMP, INT8_CLAMP)
    for rows, lo_hi, q in _blocks(values, params, codes):
        lo, hi = torch.aminmax(rows, dim=1)
        scale = (hi - lo) / 255.0
        lo_hi[:, 0] = lo
        lo_hi[:, 1] = scale
        step = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
        rows.sub_(lo[:, None]).div_(step).round_().clamp_(0, 255)
        q.copy_(rows.view(-1))


def _blocks(
    values: torch.Tensor, params: torch.Tensor, codes: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(elements as rows of one block, their (offset, scale) rows, their codes) for the full
    blocks and for the short last one: views, no copies."""
    n = values.numel()
    full = n // INT8_BLOCK
    parts = []
    if full:
        cut = full * INT8_BLOCK
        parts.append((values[:cut].view(full, INT8_BLOCK), params[:full], codes[:cut]))
    if n > full * INT8_BLOCK:
        cut = full * INT8_BLOCK
        parts.append((values[cut:].view(1, -1), params[full:], codes[cut:]))
    return parts


@torch.no_grad()
def decode(encoding: int, wire: torch.Tensor, out: torch.Tensor) -> None:
    """Decode the payload `wire` (uint8, as received) into the 1-D float32 tensor `out`.

    Raises Reject, leaving `out` untouched, when the payload's size does not match `out`'s
    elements in `encoding`, or an int8 block's offset or scale is not finite or out of bounds.
    (A NaN or an infinity in a float encoding is decoded as such: the receiver's finiteness
    check, as for fp32, refuses it.)
    """
    n = out.numel()
    if wire.dtype != torch.uint8 or wire.dim() != 1:
        raise ValueError("the payload must be a 1-D uint8 tensor")
    if wire.numel() != payload_bytes(encoding, n):
        raise Reject(
            Status.INVALID,
            Why.PAYLOAD_SIZE,
            f"payload of {wire.numel()} bytes, {n} elements need {payload_bytes(encoding, n)}",
        )
    if encoding == pb.ENCODING_FP32:
        out.copy_(wire.view(torch.float32))
    elif encoding == pb.ENCODING_BF16:
        out.copy_(wire.view(torch.bfloat16))
    elif encoding == pb.ENCODING_FP16:
        out.copy_(wire.view(torch.float16))
    else:  # payload_bytes() refused every other encoding
        _decode_int8(wire, out)


def _decode_int8(wire: torch.Tensor, out: torch.Tensor) -> None:
    blocks = -(-out.numel() // INT8_BLOCK)
    params = wire[: blocks * INT8_PARAM_BYTES].view(torch.float32).view(blocks, 2)
    codes = wire[blocks * INT8_PARAM_BYTES :]
    offset, scale = params[:, 0], params[:, 1]
    top = offset + 255.0 * scale  # the largest element a block decodes to, as decoding rounds
    if not bool(torch.isfinite(top).all()) or not bool((scale >= 0).all()):
        raise Reject(
            Status.INVALID,
            Why.SCALE,
            "an int8 block's offset or scale is not finite, or its scale is negative",
        )
    out.copy_(codes)
    for rows, lo_hi, _ in _blocks(out, params, codes):
        rows.mul_(lo_hi[:, 1:2]).add_(lo_hi[:, 0:1])
