"""The wire contract: committed generated code is fresh, and every field is documented."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from gosgd_p2p import protogen
from gosgd_p2p.v1 import gossip_pb2 as pb

PROTO = protogen.PROTO_ROOT / "gosgd_p2p" / "v1" / "gossip.proto"

FIELD = re.compile(r"^\s*(?:optional\s+|repeated\s+)?[\w.]+\s+(\w+)\s*=\s*\d+\s*;")
ENUM_VALUE = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s*\d+\s*;")
BLOCK = re.compile(r"^\s*(message|enum|service)\s+(\w+)\s*\{")


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpcio-tools (dev extra) is not installed: cannot regenerate the protos",
)
def test_committed_generated_code_is_fresh(tmp_path: Path) -> None:
    protogen.generate(tmp_path)
    generated = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    names = {p.relative_to(tmp_path).as_posix() for p in generated}
    assert {
        "gosgd_p2p/v1/gossip_pb2.py",
        "gosgd_p2p/v1/gossip_pb2.pyi",
        "gosgd_p2p/v1/gossip_pb2_grpc.py",
    } <= names
    stale = [
        rel
        for rel in sorted(names)
        if not (protogen.ROOT / rel).is_file()
        or (protogen.ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    assert not stale, f"stale generated code {stale}: run `python -m gosgd_p2p.protogen`"


def _documented_items(text: str) -> dict[str, list[tuple[str, bool]]]:
    """For each message and enum: its (field or value name, has a comment directly above)."""
    out: dict[str, list[tuple[str, bool]]] = {}
    block: tuple[str, str] | None = None
    prev = ""
    for line in text.splitlines():
        stripped = line.strip()
        if m := BLOCK.match(line):
            block = (m.group(1), m.group(2))
            if block[0] != "service":
                out.setdefault(block[1], [])
        elif stripped.startswith("}"):
            block = None
        elif block is not None and block[0] in ("message", "enum"):
            pattern = FIELD if block[0] == "message" else ENUM_VALUE
            if m := pattern.match(line):
                out[block[1]].append((m.group(1), prev.startswith("//")))
        prev = stripped
    return out


def test_the_parser_finds_every_field_protobuf_knows() -> None:
    items = _documented_items(PROTO.read_text())
    for name, desc in pb.DESCRIPTOR.message_types_by_name.items():
        assert [f for f, _ in items[name]] == [f.name for f in desc.fields], name
    for name, desc in pb.DESCRIPTOR.enum_types_by_name.items():
        assert [v for v, _ in items[name]] == [v.name for v in desc.values], name


def test_every_field_has_a_comment_directly_above() -> None:
    items = _documented_items(PROTO.read_text())
    bare = [f"{msg}.{field}" for msg, fields in items.items() for field, ok in fields if not ok]
    assert bare == [], f"fields without a comment line directly above: {bare}"


def test_the_comment_check_catches_a_bare_field() -> None:
    text = "message M {\n  // documented\n  uint32 a = 1;\n\n  uint32 b = 2;\n}\n"
    assert _documented_items(text) == {"M": [("a", True), ("b", False)]}
