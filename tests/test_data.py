"""Loading, sharding, sampling and evaluation in gosgd_p2p.data."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from gosgd_p2p.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DATASETS,
    BatchSampler,
    Dataset,
    evaluate,
    load_dataset,
    parse_shard,
    shard,
    short_data_note,
)
from gosgd_p2p.models import build_model

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def _toy_dataset(n_train: int) -> Dataset:
    """A dataset whose example i is the scalar i, so shards can be compared by value."""
    x = torch.arange(n_train, dtype=torch.float32).view(-1, 1, 1, 1)
    y = torch.arange(n_train) % 3
    test_x, test_y = torch.zeros(2, 1, 1, 1), torch.zeros(2, dtype=torch.int64)
    return Dataset("toy", x, y, test_x, test_y, (1, 1, 1), 3)


# -- load_dataset ------------------------------------------------------------------------------


def test_datasets_lists_the_three_sources() -> None:
    assert DATASETS == ("digits", "synthetic", "cifar10")


def test_digits_sizes_shapes_dtypes_and_labels(digits: Dataset) -> None:
    assert digits.name == "digits"
    assert digits.train_x.shape == (1437, 1, 8, 8)
    assert digits.test_x.shape == (360, 1, 8, 8)
    assert digits.train_y.shape == (1437,) and digits.test_y.shape == (360,)
    assert digits.train_x.dtype == digits.test_x.dtype == torch.float32
    assert digits.train_y.dtype == digits.test_y.dtype == torch.int64
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    for y in (digits.train_y, digits.test_y):
        assert set(y.tolist()) == set(range(10))
    # Standardised with train statistics.
    assert abs(digits.train_x.mean().item()) < 1e-4
    assert abs(digits.train_x.std().item() - 1.0) < 1e-3


def test_digits_split_is_fixed(digits: Dataset) -> None:
    again = load_dataset("digits", data_dir="/ignored")
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, field), getattr(digits, field))


def test_synthetic_is_deterministic_with_expected_sizes() -> None:
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    for field in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert a.train_x.shape == (4000, 1, 8, 8) and a.test_x.shape == (1000, 1, 8, 8)
    assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.int64
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert set(a.train_y.tolist()) == set(range(10))


def test_synthetic_is_learnable_by_an_mlp() -> None:
    data = load_dataset("synthetic")
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = BatchSampler(data.train_x, data.train_y, batch_size=64, seed=0)
    while batches.epoch < 3:
        x, y = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    _, accuracy = evaluate(model, data.test_x, data.test_y, CPU)
    assert accuracy > 0.9


def test_unknown_dataset_raises_naming_choices() -> None:
    with pytest.raises(ValueError) as info:
        load_dataset("mnist")
    assert "\n" not in str(info.value)
    assert all(name in str(info.value) for name in DATASETS)


# -- cifar10 -----------------------------------------------------------------------------------


def _write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], protocol: int) -> None:
    batch = {
        b"batch_label": b"testing batch",
        b"labels": labels,
        b"data": images.reshape(len(labels), 3072),
        b"filenames": [b"img_%d.png" % i for i in range(len(labels))],
    }
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=protocol)


def _write_cifar_folder(
    folder: Path, sizes: tuple[int, ...], protocol: int = pickle.HIGHEST_PROTOCOL
) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """Write data_batch_1..len(sizes) plus a 5-image test_batch; return what was written."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = [], []
    for i, size in enumerate(sizes, start=1):
        images = rng.integers(0, 256, (size, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size).tolist()
        _write_cifar_batch(folder / f"data_batch_{i}", images, labels, protocol)
        train_images.append(images)
        train_labels += labels
    test_images = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    test_labels = rng.integers(0, 10, 5).tolist()
    _write_cifar_batch(folder / "test_batch", test_images, test_labels, protocol)
    return np.concatenate(train_images), train_labels, test_images, test_labels


def _cifar_normalised(images: np.ndarray) -> Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (torch.from_numpy(images).float() / 255.0 - mean) / std


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_reads_a_partial_folder(tmp_path: Path, protocol: int) -> None:
    train_images, train_labels, test_images, test_labels = _write_cifar_folder(
        tmp_path, (10, 10), protocol
    )
    data = load_dataset("cifar10", str(tmp_path))
    assert data.name == "cifar10" and data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (5, 3, 32, 32)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.train_y.tolist() == train_labels
    assert data.test_y.tolist() == test_labels
    torch.testing.assert_close(data.train_x, _cifar_normalised(train_images))
    torch.testing.assert_close(data.test_x, _cifar_normalised(test_images))


def test_cifar10_accepts_the_parent_folder(tmp_path: Path) -> None:
    _, train_labels, _, _ = _write_cifar_folder(tmp_path / "cifar-10-batches-py", (4, 3, 2))
    data = load_dataset("cifar10", str(tmp_path))
    assert data.train_y.tolist() == train_labels


@pytest.mark.parametrize("layout", ["missing", "empty", "no_test_batch", "no_data_dir"])
def test_cifar10_without_files_raises_file_not_found(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "cifar"
    if layout == "empty":
        folder.mkdir()
    elif layout == "no_test_batch":
        _write_cifar_folder(folder, (3,))
        (folder / "test_batch").unlink()
    data_dir = None if layout == "no_data_dir" else str(folder)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", data_dir)
    message = str(info.value)
    assert "\n" not in message
    assert "data_batch_1" in message and "test_batch" in message
    if data_dir is not None:
        assert data_dir in message


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


def test_cifar10_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    _write_cifar_folder(tmp_path, (2,))
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"data": _RunsCode(), b"labels": [0]}, f)
    with pytest.raises(pickle.UnpicklingError, match="os"):
        load_dataset("cifar10", str(tmp_path))


# -- parse_shard and shard ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"), [("0/1", (0, 1)), ("3/4", (3, 4)), (" 2/5 ", (2, 5))]
)
def test_parse_shard_accepts_valid_specs(spec: str, expected: tuple[int, int]) -> None:
    assert parse_shard(spec) == expected


@pytest.mark.parametrize("spec", ["3/3", "a/b", "-1/2", "1", "0/0", "", "1/2/3", "1.0/2"])
def test_parse_shard_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_shard(spec)
    assert "\n" not in str(info.value)
    assert "i/n" in str(info.value)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n_train=st.integers(1, 300))
def test_shards_partition_the_train_set(data: st.DataObject, n_train: int) -> None:
    count = data.draw(st.integers(1, n_train), label="count")
    toy = _toy_dataset(n_train)
    shards = [shard(toy, i, count) for i in range(count)]
    values = [s.train_x.flatten().long().tolist() for s in shards]
    everything = sorted(v for vs in values for v in vs)
    assert everything == list(range(n_train))  # union is exact and pairwise disjoint
    sizes = [len(vs) for vs in values]
    assert max(sizes) - min(sizes) <= 1
    for s in shards:
        assert s.test_x is toy.test_x and s.test_y is toy.test_y
        assert torch.equal(s.train_y, s.train_x.flatten().long() % 3)  # labels follow inputs


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_digits_shards_are_stable_and_mix_classes(digits: Dataset, count: int) -> None:
    shards = [shard(digits, i, count) for i in range(count)]
    assert sum(len(s.train_y) for s in shards) == len(digits.train_y)
    joined = torch.cat([s.train_x for s in shards]).flatten(1)
    assert torch.equal(joined.sort(dim=0)[0], digits.train_x.flatten(1).sort(dim=0)[0])
    for i, s in enumerate(shards):
        assert len(s.train_y) in (
            len(digits.train_y) // count,
            math.ceil(len(digits.train_y) / count),
        )
        assert set(s.train_y.tolist()) == set(range(10))
        assert torch.equal(shard(digits, i, count).train_x, s.train_x)  # same on every node


@pytest.mark.parametrize(("index", "count"), [(3, 3), (-1, 2), (0, 0), (0, 5)])
def test_shard_rejects_impossible_requests(index: int, count: int) -> None:
    with pytest.raises(ValueError):
        shard(_toy_dataset(4), index, count)


# -- BatchSampler ------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), batch_size=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_batch_sampler_gives_full_batches_of_distinct_examples(
    n: int, batch_size: int, seed: int
) -> None:
    x = torch.arange(n, dtype=torch.float32).view(-1, 1)
    y = torch.arange(n)
    sampler = BatchSampler(x, y, batch_size, seed)
    size = min(batch_size, n)  # fewer examples than a batch: every batch is all of them
    assert sampler.batch_len == size
    for epoch in range(3):
        assert sampler.epoch == epoch
        seen: list[int] = []
        for _ in range(n // size):
            xb, yb = next(sampler)
            assert len(yb) == size  # never a short last batch
            assert torch.equal(xb.flatten().long(), yb)  # inputs stay paired with labels
            seen += yb.tolist()
        assert len(set(seen)) == len(seen) == n - n % size  # no repeat within an epoch
    assert sampler.epoch == 3


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), batch_size=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_batch_sampler_without_drop_last_covers_every_example_once_per_epoch(
    n: int, batch_size: int, seed: int
) -> None:
    x = torch.arange(n, dtype=torch.float32).view(-1, 1)
    y = torch.arange(n)
    sampler = BatchSampler(x, y, batch_size, seed, drop_last=False)
    batches_per_epoch = math.ceil(n / batch_size)
    for epoch in range(3):
        assert sampler.epoch == epoch
        seen: list[int] = []
        for _ in range(batches_per_epoch):
            xb, yb = next(sampler)
            assert 1 <= len(yb) <= batch_size
            assert torch.equal(xb.flatten().long(), yb)  # inputs stay paired with labels
            seen += yb.tolist()
        assert sorted(seen) == list(range(n))
    assert sampler.epoch == 3


def test_batch_sampler_leaves_out_different_examples_each_epoch() -> None:
    # 10 examples in batches of 4: 2 sit out each epoch, but not the same 2 every time
    sampler = BatchSampler(torch.zeros(10, 1), torch.arange(10), batch_size=4, seed=0)
    seen = {i for _ in range(20) for i in next(sampler)[1].tolist()}
    assert seen == set(range(10))


def test_short_data_note_only_when_a_batch_does_not_fit() -> None:
    assert short_data_note(32, 32) is None and short_data_note(359, 32, "0/4") is None
    note = short_data_note(14, 32, "0/100")
    assert note is not None and "\n" not in note
    assert "shard 0/100 has 14 examples" in note and "--batch-size 14 or less" in note
    assert "fewer shards" in note
    whole = short_data_note(5, 8)
    assert whole is not None and "the training set has 5" in whole and "shards" not in whole


def _first_epoch(seed: int, n: int = 50) -> list[int]:
    sampler = BatchSampler(torch.zeros(n, 1), torch.arange(n), batch_size=8, seed=seed)
    return [i for _, yb in (next(sampler) for _ in range(n // 8)) for i in yb.tolist()]


def test_batch_sampler_order_depends_on_seed_only() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = _first_epoch(seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    torch.manual_seed(99)
    assert _first_epoch(seed=1) == first
    assert _first_epoch(seed=2) != first


def test_batch_sampler_reshuffles_each_epoch() -> None:
    sampler = iter(BatchSampler(torch.zeros(40, 1), torch.arange(40), batch_size=40, seed=0))
    first, second = next(sampler)[1], next(sampler)[1]
    assert sorted(first.tolist()) == sorted(second.tolist())
    assert not torch.equal(first, second)


@pytest.mark.parametrize(("n_x", "n_y", "batch_size"), [(3, 4, 1), (0, 0, 1), (3, 3, 0)])
def test_batch_sampler_rejects_bad_arguments(n_x: int, n_y: int, batch_size: int) -> None:
    with pytest.raises(ValueError):
        BatchSampler(torch.zeros(n_x, 1), torch.zeros(n_y), batch_size, seed=0)


# -- evaluate ----------------------------------------------------------------------------------


class _OneHotOracle(nn.Module):
    """Returns its input as logits and records the mode and grad state of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return x.flatten(1)


def _one_hot_inputs(y: Tensor, num_classes: int = 10) -> Tensor:
    return 5.0 * F.one_hot(y, num_classes).float().view(len(y), 1, 1, num_classes)


@pytest.mark.parametrize("train_mode", [True, False])
def test_evaluate_scores_a_perfect_model_and_restores_mode(train_mode: bool) -> None:
    y = torch.arange(25) % 10
    x = _one_hot_inputs(y)
    model = _OneHotOracle().train(train_mode)
    loss, accuracy = evaluate(model, x, y, CPU, batch_size=7)
    assert accuracy == 1.0
    assert loss == pytest.approx(F.cross_entropy(x.flatten(1), y).item(), rel=1e-5)
    assert len(model.calls) == 4  # ceil(25 / 7) chunks
    assert all(call == (False, False) for call in model.calls)  # eval mode, no grad
    assert model.training is train_mode


def test_evaluate_counts_wrong_predictions() -> None:
    y = torch.arange(20) % 10
    x = _one_hot_inputs(y)
    wrong = y.clone()
    wrong[:5] = (wrong[:5] + 1) % 10
    _, accuracy = evaluate(_OneHotOracle(), x, wrong, CPU, batch_size=6)
    assert accuracy == pytest.approx(0.75)
