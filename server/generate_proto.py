"""Regenerates the Python gRPC code in sluice_server/pb/ from proto/generate.proto.

Run from anywhere: `python server/generate_proto.py`. The generated files are committed, so the
package works without grpcio-tools; tests/test_proto_fresh.py fails when they are stale.
"""

import argparse
import importlib.resources
import re
import sys
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "proto"
PROTO_FILE = "generate.proto"
DEFAULT_OUT_DIR = REPO_ROOT / "server" / "sluice_server" / "pb"


def generate(out_dir: Path) -> None:
    """Writes generate_pb2.py, generate_pb2.pyi and generate_pb2_grpc.py into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known_protos = importlib.resources.files("grpc_tools") / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--proto_path={well_known_protos}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            PROTO_FILE,
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")
    # protoc writes a top-level import; inside the package it must be relative.
    grpc_file = out_dir / "generate_pb2_grpc.py"
    code = grpc_file.read_text()
    fixed = re.sub(
        r"^import generate_pb2 as", "from . import generate_pb2 as", code, flags=re.MULTILINE
    )
    grpc_file.write_text(fixed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    generate(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
