"""The committed generated gRPC code must match proto/generate.proto."""

import subprocess
import sys
from pathlib import Path

import pytest

SERVER_DIR = Path(__file__).resolve().parent.parent
COMMITTED_DIR = SERVER_DIR / "sluice_server" / "pb"
GENERATED_FILES = ["generate_pb2.py", "generate_pb2.pyi", "generate_pb2_grpc.py"]


@pytest.fixture(scope="module")
def regenerated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("pb")
    subprocess.run(
        [sys.executable, str(SERVER_DIR / "generate_proto.py"), "--out-dir", str(out_dir)],
        check=True,
    )
    return out_dir


@pytest.mark.parametrize("name", GENERATED_FILES)
def test_generated_code_is_fresh(regenerated_dir: Path, name: str) -> None:
    assert (regenerated_dir / name).read_text() == (COMMITTED_DIR / name).read_text(), (
        f"sluice_server/pb/{name} is stale: run `python server/generate_proto.py`"
    )
