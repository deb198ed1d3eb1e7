"""The gosgd-node command line: its flags, and one-line errors for bad ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gosgd_p2p.cli import build_parser, configs_from_args

REQUIRED_FLAGS = [
    "--listen", "--peers", "--node-id", "--cluster", "--p", "--model", "--dataset",
    "--data-dir", "--shard", "--batch-size", "--lr", "--momentum", "--steps", "--device",
    "--eval-every", "--log-json",
]  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gosgd_p2p.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_every_flag_other_tools_drive() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in REQUIRED_FLAGS:
        assert flag in result.stdout, flag


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--no-such-flag"], "unrecognized arguments"),
        (["--p", "1.5"], "p must be in [0, 1]"),
        (["--model", "vgg"], "invalid choice"),
        (["--peers", "localhost"], "is not HOST:PORT"),
        (["--listen", "nowhere"], "is not HOST:PORT"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--steps", "ten"], "invalid int value"),
        (["--chunk-kib", "8192"], "chunk_bytes must be in [4096, 4194304]"),
        (["--schedule", "hourly"], "invalid choice"),
        (["--push-rate", "-1"], "push rate must be >= 0"),
        (["--encoding", "int4"], "invalid choice"),
        (["--max-send-mbps", "0"], "max_send_mbps must be > 0"),
    ],
)
def test_bad_flags_give_one_line(args: list[str], needle: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and "gosgd-node: error:" in lines[0]


def test_runtime_errors_are_one_line_too(tmp_path) -> None:
    result = run_cli("--dataset", "cifar10", "--data-dir", str(tmp_path / "none"), "--steps", "1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("gosgd-node: error: cifar10 needs")


def test_flags_map_onto_the_configs() -> None:
    args = build_parser().parse_args(
        ["--peers", "10.0.0.1:5000, 10.0.0.2:5000", "--p", "0.25", "--shard", "1/4", "--lr", "0.1",
         "--chunk-kib", "256", "--send-process", "--encoding", "int8", "--max-send-mbps", "8"]
    )  # fmt: skip
    node, train = configs_from_args(args)
    assert node.send_process
    assert node.encoding == "int8" and node.max_send_mbps == 8.0
    assert node.peers == ["10.0.0.1:5000", "10.0.0.2:5000"]
    assert node.p == 0.25 and train.shard == "1/4" and train.lr == 0.1
    assert node.chunk_bytes == 256 << 10


def test_the_push_schedule_flags_map_onto_the_node_config() -> None:
    node, _ = configs_from_args(build_parser().parse_args([]))
    assert node.schedule == "clock" and node.push_rate is None  # the measured default
    args = build_parser().parse_args(["--schedule", "step", "--push-rate", "2.5"])
    node, _ = configs_from_args(args)
    assert node.schedule == "step" and node.push_rate == 2.5


def test_the_network_process_flag_maps_onto_the_node_config() -> None:
    node, _ = configs_from_args(build_parser().parse_args([]))
    assert not node.network_process  # threads stay the default (README, "Which mode")
    node, _ = configs_from_args(build_parser().parse_args(["--network-process"]))
    assert node.network_process and not node.send_process
