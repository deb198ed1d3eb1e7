"""Generate the Python code for protos/ into gosgd_p2p/v1/ (needs grpcio-tools, a dev extra).

Run `python -m gosgd_p2p.protogen` after editing a .proto; `tests/test_protos.py` fails while
the committed code differs from what this produces.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[Path]:
    """The .proto sources, relative to protos/, in a stable order."""
    return sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every .proto under `out_dir`."""
    from grpc_tools import protoc  # dev dependency: imported only here

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: see the message above")


def main() -> None:
    generate(ROOT)
    print(f"generated code for {len(proto_files())} proto file(s) under {ROOT / 'gosgd_p2p'}")


if __name__ == "__main__":
    main()
