"""Data sets, per-node shards, mini-batch sampling and evaluation.

Everything here is deterministic given its seeds, so every node that loads the same data set and
asks for shard ``i/n`` gets the same examples, with no coordination over the network. Tensors are
returned on the CPU; the trainer moves batches to its device.
"""

from __future__ import annotations

import gzip
import importlib.resources
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gosgd_p2p.config import DATASETS

# Seed of the fixed digits train/test split; changing it changes every reported digits result.
DIGITS_SPLIT_SEED = 0
# Share of the 1797 digits held out for test: ceil(0.2 * 1797) = 360 rows.
DIGITS_TEST_FRACTION = 0.2

# Seed, sizes and difficulty of the synthetic data set. Noise std 2.0 against unit-variance
# templates makes classes overlap a little: an mlp reaches about 96 % test accuracy rather than
# 100 % after one epoch, so curves still show learning.
SYNTHETIC_SEED = 1234
SYNTHETIC_CLASSES = 10
SYNTHETIC_SHAPE = (1, 8, 8)
SYNTHETIC_TRAIN = 4000
SYNTHETIC_TEST = 1000
SYNTHETIC_NOISE_STD = 2.0

# Seed of the permutation that shard() slices; every node must use the same one.
SHARD_SEED = 0

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
# Per-channel mean and std of the CIFAR-10 training images in [0, 1] (RGB order).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Dataset:
    """A labelled image data set held in memory on the CPU.

    ``*_x`` are float32 (N, C, H, W), already normalised; ``*_y`` are int64 (N,) class indices in
    ``[0, num_classes)``. ``input_shape`` is (C, H, W) of one example.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    input_shape: tuple[int, int, int]
    num_classes: int


def _permutation(n: int, seed: int) -> Tensor:
    """The same permutation of ``range(n)`` on every machine and torch build (CPU generator)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x - mean) / std per channel, in place; ``mean`` and ``std`` have shape (C,)."""
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def _standardise(train_x: Tensor, test_x: Tensor) -> None:
    """Normalise both splits in place with the per-channel mean/std of the training split only,
    so no test statistics leak into the inputs."""
    mean = train_x.mean(dim=(0, 2, 3))
    std = train_x.std(dim=(0, 2, 3))
    _normalise(train_x, mean, std)
    _normalise(test_x, mean, std)


def _load_digits(data_dir: str | None) -> Dataset:
    del data_dir  # bundled with the package
    resource = importlib.resources.files("gosgd_p2p").joinpath("datasets/digits.csv.gz")
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        rows = np.loadtxt(text, delimiter=",", dtype=np.float32, ndmin=2)
    x = torch.from_numpy(rows[:, :64] / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(rows[:, 64]).to(torch.int64)
    order = _permutation(len(y), DIGITS_SPLIT_SEED)
    n_test = math.ceil(DIGITS_TEST_FRACTION * len(y))
    test, train = order[:n_test], order[n_test:]
    train_x, test_x = x[train], x[test]
    _standardise(train_x, test_x)
    return Dataset("digits", train_x, y[train], test_x, y[test], (1, 8, 8), 10)


def _load_synthetic(data_dir: str | None) -> Dataset:
    del data_dir  # generated, nothing to read
    gen = torch.Generator().manual_seed(SYNTHETIC_SEED)
    templates = torch.randn((SYNTHETIC_CLASSES, *SYNTHETIC_SHAPE), generator=gen)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(SYNTHETIC_CLASSES, (n,), generator=gen)
        noise = torch.randn((n, *SYNTHETIC_SHAPE), generator=gen)
        return templates[y] + SYNTHETIC_NOISE_STD * noise, y

    # Train first, then test: the order of draws from `gen` fixes both.
    train_x, train_y = draw(SYNTHETIC_TRAIN)
    test_x, test_y = draw(SYNTHETIC_TEST)
    _standardise(train_x, test_x)
    return Dataset(
        "synthetic", train_x, train_y, test_x, test_y, SYNTHETIC_SHAPE, SYNTHETIC_CLASSES
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the numpy globals a CIFAR-10 batch needs, so a file dropped into the data
    folder cannot run code the way an arbitrary pickle can; anything else raises
    ``pickle.UnpicklingError``."""

    _ALLOWED = frozenset(
        {
            # How the original (Python 2, protocol 2) files store arrays.
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            # Re-pickled copies: numpy 2 module paths, protocol-5 buffers, and the way
            # Python 3 writes bytes under protocol 2.
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 file")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 python batch file as uint8 (N, 3, 32, 32) images and int64 (N,) labels."""
    with path.open("rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _find_cifar_folder(data_dir: str | None) -> Path:
    """The folder holding ``test_batch`` and at least one ``data_batch_*``: ``data_dir`` itself or
    its ``cifar-10-batches-py`` child. Raises FileNotFoundError naming what was expected."""
    if data_dir is not None:
        for folder in (Path(data_dir), Path(data_dir) / CIFAR10_FOLDER):
            has_train = any((folder / name).is_file() for name in CIFAR10_TRAIN_FILES)
            if has_train and (folder / CIFAR10_TEST_FILE).is_file():
                return folder
    where = "no --data-dir given" if data_dir is None else f"not found in {data_dir}"
    raise FileNotFoundError(
        f"cifar10 needs --data-dir with data_batch_1..5 and {CIFAR10_TEST_FILE} "
        f"(the python version from {CIFAR10_URL}); {where}"
    )


def _load_cifar10(data_dir: str | None) -> Dataset:
    folder = _find_cifar_folder(data_dir)
    parts = [_read_cifar_batch(folder / n) for n in CIFAR10_TRAIN_FILES if (folder / n).is_file()]
    test_images, test_y = _read_cifar_batch(folder / CIFAR10_TEST_FILE)
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)

    def to_float(images: Tensor) -> Tensor:
        return _normalise(images.to(torch.float32).div_(255.0), mean, std)

    train_x = to_float(torch.cat([images for images, _ in parts]))
    train_y = torch.cat([labels for _, labels in parts])
    return Dataset("cifar10", train_x, train_y, to_float(test_images), test_y, (3, 32, 32), 10)


_LOADERS: dict[str, Callable[[str | None], Dataset]] = {
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "cifar10": _load_cifar10,
}
if tuple(_LOADERS) != DATASETS:  # config.DATASETS names them for the CLI, without torch
    raise ImportError(f"config.DATASETS {DATASETS} does not list the loaders {tuple(_LOADERS)}")


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    """Load data set ``name`` (one of ``DATASETS``); never downloads anything.

    ``data_dir`` is only read by ``cifar10`` (the python-pickle folder or its parent). Raises
    ``ValueError`` for an unknown name and ``FileNotFoundError`` when cifar10 files are missing.
    """
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}"
        ) from None
    return loader(data_dir)


_SHARD_SPEC = re.compile(r"(\d+)/(\d+)")


def parse_shard(spec: str) -> tuple[int, int]:
    """Parse ``"i/n"`` into ``(i, n)`` with ``0 <= i < n``; raises ``ValueError`` otherwise."""
    match = _SHARD_SPEC.fullmatch(spec.strip())
    if match is not None:
        index, count = int(match[1]), int(match[2])
        if index < count:
            return index, count
    raise ValueError(f"bad shard {spec!r}: expected 'i/n' with integers 0 <= i < n, e.g. '0/4'")


def shard(dataset: Dataset, index: int, count: int) -> Dataset:
    """Shard ``index`` of ``count`` of the training split; the test split is kept whole.

    The ``count`` shards are disjoint, their union is the training set, and their sizes differ by
    at most one. They are contiguous slices of a fixed permutation (``SHARD_SEED``), so every node
    computes the same partition and each shard holds a mix of all classes.
    """
    n = len(dataset.train_y)
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range for {count} shards")
    if count > n:
        raise ValueError(f"cannot split {n} training examples into {count} non-empty shards")
    order = _permutation(n, SHARD_SEED)
    mine = order[index * n // count : (index + 1) * n // count]
    return replace(dataset, train_x=dataset.train_x[mine], train_y=dataset.train_y[mine])


class BatchSampler:
    """An endless stream of ``(x, y)`` mini-batches, reshuffled at the start of every epoch.

    With ``drop_last`` (the default, as in ``DataLoader(drop_last=True)``) every batch holds
    exactly ``batch_size`` examples: an epoch is the ``N // batch_size`` full batches of a fresh
    permutation, and the ``N % batch_size`` examples it leaves over sit out that epoch only (the
    next permutation picks others). A short last batch would give BatchNorm a step, and running
    statistics, drawn from a handful of examples. When N < ``batch_size`` there is no full batch:
    every batch is then all N examples, reshuffled, one epoch each; ``batch_len`` says how many a
    batch holds, and ``short_data_note`` is the line to tell the user.

    ``drop_last=False`` visits every example exactly once per epoch, with a smaller last batch
    when ``batch_size`` does not divide N.

    The order depends only on ``seed`` (a private ``torch.Generator``), so it does not disturb or
    depend on the global RNG. ``epoch`` counts completed epochs.
    """

    def __init__(
        self, x: Tensor, y: Tensor, batch_size: int, seed: int, drop_last: bool = True
    ) -> None:
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(
                f"need equally many, non-zero inputs and labels, got {len(x)}/{len(y)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.drop_last = drop_last
        # examples in every batch (drop_last), or in every batch but an epoch's last
        self.batch_len = min(batch_size, len(x))
        # where an epoch ends in the permutation: after its last full batch with drop_last
        self._end = len(x) - len(x) % self.batch_len if drop_last else len(x)
        self.epoch = 0
        self._gen = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(len(x), generator=self._gen)
        self._pos = 0

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self._pos >= self._end:
            self._order = torch.randperm(len(self.x), generator=self._gen)
            self._pos = 0
        idx = self._order[self._pos : min(self._pos + self.batch_len, self._end)]
        self._pos += len(idx)
        if self._pos >= self._end:
            self.epoch += 1
        return self.x[idx], self.y[idx]


def short_data_note(n: int, batch_size: int, shard_spec: str | None = None) -> str | None:
    """The one line to show a user whose training set (or shard ``shard_spec``, "i/n") holds
    fewer than ``batch_size`` examples, so that every ``BatchSampler`` batch is all ``n`` of
    them; it names the fix. None when a full batch fits."""
    if n >= batch_size:
        return None
    what = f"shard {shard_spec}" if shard_spec else "the training set"
    fix = f"--batch-size {n} or less" + (", or fewer shards" if shard_spec else "")
    return (
        f"{what} has {n} examples, fewer than --batch-size {batch_size}: every step trains on "
        f"all {n} (use {fix})"
    )


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, device: torch.device, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy loss (nats) and accuracy in [0, 1] of ``model`` on ``(x, y)``.

    Runs in eval mode under ``torch.no_grad`` in chunks of ``batch_size`` moved to ``device``, and
    restores ``model.training`` afterwards. ``model`` must already live on ``device``.
    """
    if len(x) == 0:
        raise ValueError("evaluate needs at least one example")
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size].to(device)
                yb = y[start : start + batch_size].to(device)
                logits = model(xb)
                total_loss += F.cross_entropy(logits, yb, reduction="sum").item()
                correct += int((logits.argmax(dim=1) == yb).sum().item())
    finally:
        model.train(was_training)
    return total_loss / len(x), correct / len(x)
