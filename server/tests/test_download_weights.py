"""`sluice-server download-weights` against a stand-in for the Hugging Face Hub
(integration-tests/fake_hub.py): which files it fetches, resuming, offline mode, and the one-line
errors the launcher shows."""

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration-tests"))
from fake_hub import FakeHub  # noqa: E402

TOKEN = "hf_test_token"
# The Hub's and transformers' variables, which would change what the command does.
HUB_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
SERVING_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
# Larger than two of huggingface_hub's 10 MiB read chunks, so that one whole chunk arrives
# before the connection breaks halfway and the client resumes after it.
LARGE_FILE_BYTES = 24 << 20


@dataclass
class Download:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        return self.stderr.strip().splitlines()[-1]

    @property
    def snapshot(self) -> Path:
        return Path(self.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    common = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}"}
    with FakeHub() as hub:
        hub.add_repo(
            "test-org/model",
            {
                **common,
                "tokenizer_config.json": b'{"chat_template": ""}',
                "model.safetensors": b"weights",
                # Listed by the Hub, but not for serving.
                "README.md": b"# a model",
                "pytorch_model.bin": b"pickled weights",
                "original/consolidated.safetensors": b"the same weights again",
            },
        )
        hub.add_repo(
            "test-org/sharded",
            {
                **common,
                "model.safetensors.index.json": (
                    b'{"weight_map": {"a": "model-00001-of-00002.safetensors",'
                    b' "b": "model-00002-of-00002.safetensors"}}'
                ),
                "model-00001-of-00002.safetensors": b"a",
                "model-00002-of-00002.safetensors": b"b",
                "consolidated.safetensors": b"ab",
            },
        )
        hub.add_repo("test-org/gated", {**common, "model.safetensors": b"w"}, gated_token=TOKEN)
        hub.add_repo("test-org/bin-only", {**common, "pytorch_model.bin": b"pickled weights"})
        hub.add_repo(
            "test-org/large",
            {**common, "model.safetensors": os.urandom(LARGE_FILE_BYTES)},
            break_once={"model.safetensors"},
        )
        yield hub


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "hub-cache"


def download(hub: FakeHub, cache: Path, *args: str, **environment: str) -> Download:
    env = {name: value for name, value in os.environ.items() if name not in HUB_VARIABLES}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_CACHE=str(cache),
        # Keeps a token stored on this machine out of the test.
        HF_HOME=str(cache.parent / "hf-home"),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        **environment,
    )
    result = subprocess.run(
        [sys.executable, "-m", "sluice_server", "download-weights", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return Download(result.returncode, result.stdout, result.stderr)


def test_downloads_only_what_serving_needs_into_the_cache(hub: FakeHub, cache: Path) -> None:
    result = download(hub, cache, "test-org/model")
    assert result.returncode == 0, result.stderr
    repo = hub.repos["test-org/model"]
    assert result.snapshot == cache / "models--test-org--model" / "snapshots" / repo.commit
    assert (cache / "models--test-org--model" / "refs" / "main").read_text() == repo.commit
    assert {path.name for path in result.snapshot.iterdir()} == SERVING_FILES
    assert (result.snapshot / "model.safetensors").read_bytes() == b"weights"
    assert hub.downloaded_files("test-org/model") == SERVING_FILES

    # A second run finds everything cached and fetches no file again.
    fetched_before = len(hub.downloads("test-org/model"))
    again = download(hub, cache, "test-org/model")
    assert again.returncode == 0, again.stderr
    assert again.snapshot == result.snapshot
    assert len(hub.downloads("test-org/model")) == fetched_before


def test_a_sharded_model_fetches_the_files_its_index_names(hub: FakeHub, cache: Path) -> None:
    result = download(hub, cache, "test-org/sharded")
    assert result.returncode == 0, result.stderr
    assert hub.downloaded_files("test-org/sharded") == {
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }


def test_an_interrupted_download_resumes_where_it_broke_off(hub: FakeHub, cache: Path) -> None:
    result = download(hub, cache, "test-org/large")
    assert result.returncode == 0, result.stderr
    content = hub.repos["test-org/large"].files["model.safetensors"]
    written = (result.snapshot / "model.safetensors").read_bytes()
    assert hashlib.sha256(written).digest() == hashlib.sha256(content).digest()

    weights = [r for r in hub.downloads("test-org/large") if r.path.endswith("model.safetensors")]
    assert len(weights) == 2, weights
    assert "range" not in weights[0].headers
    resumed_at = weights[1].headers["range"]
    assert resumed_at.startswith("bytes=") and resumed_at.endswith("-"), resumed_at
    assert 0 < int(resumed_at[len("bytes=") : -1]) <= LARGE_FILE_BYTES // 2
    # The progress reaches the log as plain lines.
    assert "100% (25.2MB of 25.2MB)" in result.stderr, result.stderr


def test_a_gated_model_needs_a_token(hub: FakeHub, cache: Path) -> None:
    refused = download(hub, cache, "test-org/gated")
    assert refused.returncode == 1
    assert refused.error_line == (
        "sluice-server: error: test-org/gated is gated: accept its terms on the Hub and set "
        "HF_TOKEN (the Hub answered 401)"
    )
    assert not (cache / "models--test-org--gated" / "snapshots").exists()

    allowed = download(hub, cache, "test-org/gated", HF_TOKEN=TOKEN)
    assert allowed.returncode == 0, allowed.stderr
    assert (allowed.snapshot / "model.safetensors").read_bytes() == b"w"


def test_an_unknown_repository_is_named(hub: FakeHub, cache: Path) -> None:
    result = download(hub, cache, "test-org/no-such-model")
    assert result.returncode == 1
    assert result.error_line.startswith(
        "sluice-server: error: test-org/no-such-model is not a model repository on the Hub"
    ), result.stderr
    assert "set HF_TOKEN" in result.error_line


def test_a_path_is_not_a_repository_id(hub: FakeHub, cache: Path) -> None:
    result = download(hub, cache, "./models/../llama")
    assert result.returncode == 1
    assert result.error_line.startswith(
        "sluice-server: error: `./models/../llama` is not a Hugging Face Hub repository id"
    ), result.stderr


def test_an_unknown_revision_is_named(hub: FakeHub, cache: Path) -> None:
    result = download(hub, cache, "test-org/model", "--revision", "v9")
    assert result.returncode == 1
    assert result.error_line == (
        "sluice-server: error: test-org/model has no revision `v9` on the Hub"
    ), result.stderr


def test_pytorch_weights_only_point_to_convert_weights(hub: FakeHub, cache: Path) -> None:
    result = download(hub, cache, "test-org/bin-only")
    assert result.returncode == 1
    assert "has PyTorch .bin weights only" in result.error_line, result.stderr
    assert "`sluice-server convert-weights" in result.error_line, result.stderr
    assert hub.downloaded_files("test-org/bin-only") == set()


def test_offline_serves_the_cache_and_nothing_else(hub: FakeHub, cache: Path) -> None:
    missing = download(hub, cache, "test-org/model", HF_HUB_OFFLINE="1")
    assert missing.returncode == 1
    assert missing.error_line == (
        f"sluice-server: error: test-org/model (revision `main`) is not in the Hugging Face "
        f"cache ({cache}) and HF_HUB_OFFLINE is set"
    ), missing.stderr

    online = download(hub, cache, "test-org/model")
    assert online.returncode == 0, online.stderr
    requests_before = len(hub.requests)
    offline = download(hub, cache, "test-org/model", HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert offline.snapshot == online.snapshot
    assert len(hub.requests) == requests_before
