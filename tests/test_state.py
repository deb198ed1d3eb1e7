"""The flat state of gosgd_p2p.state: which tensors, their layout and fingerprint, the pool."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from gosgd_p2p.codec import buffer_numel, encode
from gosgd_p2p.inbox import Message
from gosgd_p2p.local import LocalState
from gosgd_p2p.metrics import Counters
from gosgd_p2p.state import WIRE_DTYPE, BufferPool, StateLayout, all_finite, module_state
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import float32_finite, payload_bytes

torch.set_num_threads(1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 4, bias=False)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight


# --- module_state -----------------------------------------------------------------------------


def test_module_state_takes_float_params_and_buffers_only() -> None:
    names = [n for n, _ in module_state(_net())]
    assert names == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
        "1.running_mean",
        "1.running_var",
    ]
    assert "1.num_batches_tracked" in dict(_net().named_buffers())  # it exists, and stays local


def test_module_state_aliases_the_model() -> None:
    net = _net()
    state = dict(module_state(net))
    assert all(not t.requires_grad for t in state.values())
    state["0.weight"].fill_(2.5)
    state["1.running_mean"].fill_(-1.0)
    assert torch.equal(net[0].weight, torch.full((4, 3), 2.5))
    assert torch.equal(net[1].running_mean, torch.full((4,), -1.0))


def test_module_state_lists_tied_weights_once() -> None:
    model = _Tied()
    named = module_state(model)
    assert [n for n, _ in named] == ["enc.weight", "dec.bias"]
    ptrs = [t.data_ptr() for _, t in named]
    assert len(set(ptrs)) == len(ptrs)
    assert StateLayout(named).numel == 16 + 4


def test_module_state_keeps_half_precision_tensors() -> None:
    net = nn.Linear(2, 2).half()
    assert [t.dtype for _, t in module_state(net)] == [torch.float16, torch.float16]


# --- StateLayout ------------------------------------------------------------------------------


def test_layout_offsets_are_contiguous() -> None:
    layout = StateLayout(module_state(_net()))
    offset = 0
    for spec in layout.specs:
        assert spec.offset == offset
        assert spec.numel == torch.Size(spec.shape).numel()
        offset += spec.numel
    assert layout.numel == offset == 12 + 4 + 4 + 4 + 8 + 2 + 4 + 4
    assert layout.nbytes == 4 * layout.numel
    assert len(layout.fingerprint) == 16


def test_layout_rejects_an_empty_state() -> None:
    with pytest.raises(ValueError, match="no floating-point"):
        StateLayout([])


def test_fingerprint_is_stable_across_identical_models() -> None:
    torch.manual_seed(1)
    a = StateLayout(module_state(_net()))
    torch.manual_seed(2)  # other values, same names/shapes/dtypes
    b = StateLayout(module_state(_net()))
    assert a.fingerprint == b.fingerprint


BASE = [("w", torch.zeros(2, 3)), ("b", torch.zeros(3))]


@pytest.mark.parametrize(
    "changed",
    [
        [("w", torch.zeros(3, 2)), ("b", torch.zeros(3))],  # shape, same numel
        [("w", torch.zeros(6)), ("b", torch.zeros(3))],  # rank
        [("v", torch.zeros(2, 3)), ("b", torch.zeros(3))],  # name
        [("w", torch.zeros(2, 3, dtype=torch.float16)), ("b", torch.zeros(3))],  # dtype
        [("b", torch.zeros(3)), ("w", torch.zeros(2, 3))],  # order
        [("w", torch.zeros(2, 3))],  # a tensor fewer
    ],
    ids=["shape", "rank", "name", "dtype", "order", "missing"],
)
def test_fingerprint_changes_with_the_layout(changed) -> None:
    assert StateLayout(changed).fingerprint != StateLayout(BASE).fingerprint


def test_views_alias_the_flat_buffer() -> None:
    layout = StateLayout(module_state(_net()))
    flat = torch.zeros(layout.numel, dtype=WIRE_DTYPE)
    views = layout.views(flat)
    assert [tuple(v.shape) for v in views] == [s.shape for s in layout.specs]
    for i, (view, spec) in enumerate(zip(views, layout.specs, strict=True)):
        view.fill_(i + 1)
        assert torch.equal(
            flat[spec.offset : spec.offset + spec.numel], torch.full_like(flat[: spec.numel], i + 1)
        )
    assert (flat != 0).all()  # every element belongs to some view
    flat[0] = -7.0
    assert views[0].reshape(-1)[0] == -7.0


def test_views_reject_a_buffer_of_the_wrong_size() -> None:
    layout = StateLayout(BASE)
    with pytest.raises(ValueError):
        layout.views(torch.zeros(layout.numel + 1))
    with pytest.raises(ValueError):
        layout.views(torch.zeros(1, layout.numel))


@pytest.mark.parametrize("half", [False, True], ids=["float32", "with-float16"])
def test_flatten_into_round_trips(half: bool) -> None:
    net = _net()
    if half:
        net[3].half()  # one layer in float16: takes the per-tensor copy path
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
    named = module_state(net)
    originals = [t.clone() for _, t in named]
    layout = StateLayout(named)
    assert any(s.dtype == torch.float16 for s in layout.specs) == half

    flat = torch.full((layout.numel,), float("nan"), dtype=WIRE_DTYPE)
    layout.flatten_into([t for _, t in named], flat)

    assert torch.isfinite(flat).all()
    for view, orig in zip(layout.views(flat), originals, strict=True):
        assert view.dtype == WIRE_DTYPE
        assert torch.equal(view.to(orig.dtype), orig)
    # ... and back: merging goes through the views, so they must restore the model exactly
    for (_, t), view in zip(named, layout.views(flat), strict=True):
        t.zero_()
        t.copy_(view)
    assert all(torch.equal(t, o) for (_, t), o in zip(named, originals, strict=True))


# --- BufferPool -------------------------------------------------------------------------------


def test_pool_respects_its_capacity_and_reuses_buffers() -> None:
    pool = BufferPool(numel=5, capacity=2)
    assert pool.in_use == 0
    a, b = pool.acquire(), pool.acquire()
    assert a is not None and b is not None and a is not b
    assert a.shape == (5,) and a.dtype == WIRE_DTYPE
    assert pool.in_use == 2
    assert pool.acquire() is None
    pool.release(a)
    assert pool.in_use == 1
    again = pool.acquire()
    assert again is a
    assert pool.acquire() is None
    pool.release(b)
    pool.release(again)
    assert pool.in_use == 0


def test_pool_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError):
        BufferPool(numel=1, capacity=0)


def test_pool_is_thread_safe() -> None:
    capacity, threads, rounds = 3, 6, 300
    pool = BufferPool(numel=2, capacity=capacity)
    lock = threading.Lock()
    held: set[int] = set()
    errors: list[str] = []
    peak = [0]

    def worker() -> None:
        for _ in range(rounds):
            buf = pool.acquire()
            if buf is None:
                continue
            key = id(buf)
            with lock:
                if key in held:
                    errors.append("one buffer handed to two holders")
                held.add(key)
                peak[0] = max(peak[0], len(held))
            with lock:
                held.discard(key)
            pool.release(buf)

    workers = [threading.Thread(target=worker, name=f"pool-{i}") for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=20)
        assert not w.is_alive()
    assert errors == []
    assert 1 <= peak[0] <= capacity
    assert pool.in_use == 0
    got = [pool.acquire() for _ in range(capacity + 1)]
    assert got[-1] is None
    assert len({id(b) for b in got[:-1]}) == capacity  # no more than capacity were ever made


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 7, -1])
def test_all_finite_finds_any_nan_or_infinity(bad: float, where: int) -> None:
    flat = torch.randn(1000)
    assert all_finite(flat)
    assert float32_finite(memoryview(flat.numpy()).cast("B"))  # the network process's check
    flat[where] = bad
    assert not all_finite(flat)
    assert not float32_finite(memoryview(flat.numpy()).cast("B"))


def test_all_finite_accepts_the_extremes_and_empty() -> None:
    big = torch.finfo(torch.float32).max
    for flat in (torch.tensor([big, -big, 0.0, 1e-45]), torch.empty(0)):
        assert all_finite(flat)
        assert float32_finite(memoryview(flat.numpy()).cast("B"))


# --- LocalState's merge ---------------------------------------------------------------------


def _local(model: nn.Module) -> tuple[LocalState, list[torch.Tensor]]:
    named = module_state(model)
    tensors = [t for _, t in named]
    local = LocalState(tensors, StateLayout(named), Counters())
    local.weight = 1.0
    return local, tensors


def _message(payload: torch.Tensor, weight: float, released: list[int]) -> Message:
    return Message(
        sender_id="s", message_id=len(released), weight=weight, payload=payload,
        sender_step=1, returned=False, release=lambda buf: released.append(buf.data_ptr()),
    )  # fmt: skip


@torch.no_grad()
def test_merges_from_a_reused_buffer_read_its_new_contents_and_report_the_distance() -> None:
    local, tensors = _local(_net())
    layout = local.layout
    buf = torch.empty(layout.numel)  # one receive buffer, as an inbox slot is, used again
    other = torch.empty(layout.numel)
    released: list[int] = []
    for round_, (flat, weight) in enumerate([(buf, 1.0), (other, 2.0), (buf, 4.0), (buf, 8.0)]):
        incoming = torch.randn(layout.numel, generator=torch.Generator().manual_seed(round_))
        flat.copy_(incoming)
        x = torch.cat([t.reshape(-1) for t in tensors])
        a = local.weight
        local.merge([_message(flat, weight, released)])
        want = (a * x.double() + weight * incoming.double()) / (a + weight)
        got = torch.cat([t.reshape(-1) for t in tensors])
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        assert local.weight == a + weight
        assert local.last_distance == pytest.approx(float(torch.dist(incoming, x)), rel=1e-5)
    assert released == [buf.data_ptr(), other.data_ptr(), buf.data_ptr(), buf.data_ptr()]
    assert len(local._view_cache) == 2  # the two buffers' views, kept


@torch.no_grad()
def test_a_decoded_buffer_of_a_returned_push_is_not_kept() -> None:
    local, tensors = _local(_net())
    start = [t.clone() for t in tensors]
    numel = local.layout.numel
    for encoding in (pb.ENCODING_BF16, pb.ENCODING_INT8_BLOCK):
        wire = torch.zeros(buffer_numel(encoding, numel))  # a send buffer, as the pool has it
        encode(
            encoding, torch.ones(numel), wire.view(torch.uint8)[: payload_bytes(encoding, numel)]
        )
        msg = Message(
            sender_id="me", message_id=1, weight=0.5, payload=wire, sender_step=1,
            returned=True, release=lambda buf: None, encoding=encoding,
        )  # fmt: skip
        local.merge([msg])
    assert local.weight == 2.0
    x0 = torch.cat([t.reshape(-1) for t in start])
    want = ((x0 + 0.5) / 1.5 * 1.5 + 0.5) / 2.0  # two pushes of ones, each of weight 0.5
    torch.testing.assert_close(
        torch.cat([t.reshape(-1) for t in tensors]), want, rtol=1e-2, atol=1e-2
    )
    # each decoded buffer was the merge's own: none is kept past it
    assert list(local._view_cache) == []
