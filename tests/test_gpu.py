"""The CUDA path: snapshots on a side stream, merges on the device, deferred buffer release.

These need a CUDA device; CI has none, so they run on the GPU host through
`bench/gpu_run.sh` (results in docs/benchmarks.md). `torch.cuda._sleep` keeps the training
stream busy for a known while, so "the training thread did not wait" is a checkable fact: the
stream is still busy when the call returns. Each test first runs the path once: the first call
allocates the device buffers, and a cudaMalloc may wait for the device.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import wait_until

from gosgd_p2p import GossipNode, NodeConfig, algorithm
from gosgd_p2p.codec import buffer_numel, decode, encode
from gosgd_p2p.models import build_model
from gosgd_p2p.staging import Staging
from gosgd_p2p.state import StateLayout, module_state
from gosgd_p2p.wire import ENCODINGS, payload_bytes

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BUSY_CYCLES = 200_000_000  # ~0.1 s of GPU time: far longer than any enqueueing here


def resnet() -> tuple[torch.nn.Module, StateLayout, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10).cuda()
    named = module_state(model)
    return model, StateLayout(named), [t for _, t in named]


def test_snapshot_does_not_wait_and_captures_the_state_when_taken() -> None:
    _, layout, tensors = resnet()
    staging = Staging(layout, tensors)
    host = torch.full((layout.numel,), float("nan")).pin_memory()
    staging.snapshot(host)()  # warm-up
    host.fill_(float("nan"))
    expected = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    training = torch.cuda.current_stream()
    torch.cuda._sleep(BUSY_CYCLES)
    wait = staging.snapshot(host)
    assert not training.query()  # returned while the training stream is still busy
    torch._foreach_add_(tensors, 1.0)  # the next step changes x right away
    wait()
    assert torch.equal(host, expected)
    # a second snapshot reuses the device buffer only after the first copy-out read it
    wait = staging.snapshot(host)
    wait()
    torch.testing.assert_close(host, expected + 1.0)


def test_device_merge_matches_the_cpu_and_frees_the_host_buffer_after_the_copy() -> None:
    gen = torch.Generator().manual_seed(1)
    x = [torch.randn(1000, generator=gen), torch.randn(10, 10, generator=gen)]
    xs = [torch.randn(t.shape, generator=gen) for t in x]
    layout = StateLayout([(f"t{i}", t) for i, t in enumerate(x)])
    gpu = [t.cuda() for t in x]
    staging = Staging(layout, gpu)
    host = torch.empty(layout.numel).pin_memory()
    layout.flatten_into(xs, host)
    staging.load(host)  # warm-up
    staging.release_after(lambda _: None, host)
    staging.flush()
    released: list[torch.Tensor] = []
    torch.cuda._sleep(BUSY_CYCLES)
    weight = algorithm.merge_(gpu, 1.0, layout.views(staging.load(host)), 0.5)
    staging.release_after(released.append, host)
    assert released == []  # the merge reading the copy is still queued behind the busy stream
    staging._streams["in"].synchronize()
    assert not torch.cuda.current_stream().query()  # the copy ran beside the busy stream
    staging.flush()
    assert len(released) == 1 and released[0] is host
    cpu = [t.clone() for t in x]
    assert algorithm.merge_(cpu, 1.0, layout.views(host.clone()), 0.5) == weight == 1.5
    for g, c in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(g.cpu(), c)


@pytest.mark.parametrize("send_process", [False, True], ids=["threads", "send_process"])
def test_two_cuda_nodes_exchange_exactly(send_process: bool) -> None:
    """Pushes both ways between two CUDA nodes: x = weighted mean, weight conserved. With
    send_process, a's snapshots go to page-locked shared memory that a child process sends."""
    ma, _, _ = resnet()
    torch.manual_seed(1)
    mb = build_model("resnet18", (3, 32, 32), 10).cuda()
    cfg = dict(cluster="gpu", p=0.0, mdns=False, hello_interval_s=0.2)
    a = GossipNode(ma, NodeConfig(node_id="a", send_process=send_process, **cfg))
    assert (a.send_process_pid is not None) == send_process
    b = GossipNode(mb, NodeConfig(node_id="b", peers=[a.address], **cfg))
    with a, b:
        wait_until(lambda: a.peers.live() and b.peers.live(), 20, "peers to meet")
        xa = [t.clone() for t in a.state]
        xb = [t.clone() for t in b.state]
        a.step(push_to=b.address)  # a: 1 -> 0.5, sends (xa, 0.5)
        torch._foreach_add_(a.state, 1.0)  # a trains on at once; the message must hold xa
        wait_until(lambda: a.in_flight == 0, 30, "a's push to settle")
        b.step()  # b merges: (xb * 1 + xa * 0.5) / 1.5
        assert a.stats()["pushes_acked"] == 1 and b.stats()["merged_received"] == 1
        assert math.isclose(a.finish() + b.finish(), 2.0, rel_tol=0, abs_tol=1e-12)
        for got, ya, yb in zip(b.state, xa, xb, strict=True):
            torch.testing.assert_close(got, (yb + 0.5 * ya) / 1.5, rtol=1e-5, atol=1e-5)
            assert got.is_cuda
        assert b.last_distance is not None and math.isfinite(b.last_distance)


def test_two_cuda_network_process_nodes_exchange_exactly() -> None:
    """network_process on CUDA: each node's gRPC runs in a child without torch; a snapshot goes
    to page-locked shared send memory, and a received message is merged on the device straight
    from its page-locked shared receive slot."""
    ma, _, _ = resnet()
    torch.manual_seed(1)
    mb = build_model("resnet18", (3, 32, 32), 10).cuda()
    cfg = dict(cluster="gpu", p=0.0, mdns=False, hello_interval_s=0.2, network_process=True)
    a = GossipNode(ma, NodeConfig(node_id="a", **cfg))
    b = GossipNode(mb, NodeConfig(node_id="b", peers=[a.address], **cfg))
    assert a.network_process_pid is not None and b.network_process_pid is not None
    with a, b:
        wait_until(lambda: a.peers.live() and b.peers.live(), 20, "peers to meet")
        xa = [t.clone() for t in a.state]
        xb = [t.clone() for t in b.state]
        a.step(push_to=b.address)  # a: 1 -> 0.5, sends (xa, 0.5)
        torch._foreach_add_(a.state, 1.0)
        wait_until(lambda: a.in_flight == 0, 30, "a's push to settle")
        b.step()  # b merges: (xb * 1 + xa * 0.5) / 1.5
        assert a.stats()["pushes_acked"] == 1 and b.stats()["merged_received"] == 1
        for got, ya, yb in zip(b.state, xa, xb, strict=True):
            torch.testing.assert_close(got, (yb + 0.5 * ya) / 1.5, rtol=1e-5, atol=1e-5)
            assert got.is_cuda
        b.step(push_to=a.address)  # and back, into a's receive slot
        wait_until(lambda: b.in_flight == 0, 30, "b's push to settle")
        a.step()
        assert a.stats()["merged_received"] == 1
        assert math.isclose(a.finish() + b.finish(), 2.0, rel_tol=0, abs_tol=1e-12)


@pytest.mark.parametrize("name", ["bf16", "fp16", "int8"])
def test_an_encoded_snapshot_is_encoded_on_the_device_as_on_the_cpu(name: str) -> None:
    """The device encodes before the copy out; the host buffer then holds what the CPU's
    encoding of the same state would be (bf16, fp16: bit for bit; int8: each code within one
    step, since the device may round a product differently), and it does not wait."""
    encoding = ENCODINGS[name]
    _, layout, tensors = resnet()
    staging = Staging(layout, tensors, encoding)
    host = torch.zeros(buffer_numel(encoding, layout.numel)).pin_memory()
    staging.snapshot(host)()  # warm-up
    flat = torch.cat([t.reshape(-1) for t in tensors]).cpu()
    expected = torch.empty(payload_bytes(encoding, layout.numel), dtype=torch.uint8)
    encode(encoding, flat, expected)
    torch.cuda._sleep(BUSY_CYCLES)
    wait = staging.snapshot(host)
    assert not torch.cuda.current_stream().query()
    wait()
    got = host.view(torch.uint8)[: expected.numel()]
    decoded, reference = torch.empty(layout.numel), torch.empty(layout.numel)
    decode(encoding, got.clone(), decoded)
    decode(encoding, expected, reference)
    if name == "int8":
        step = float((flat.max() - flat.min()) / 255)
        assert (decoded - reference).abs().max() <= step
    else:
        assert torch.equal(got, expected)
