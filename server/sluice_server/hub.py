"""`sluice-server download-weights`: a model's serving files from the Hugging Face Hub.

Everything about the Hub (endpoint, token, cache layout, offline mode, resuming an interrupted
transfer) is huggingface_hub's: this module decides which files serving needs and turns the
Hub's failures into one-line answers. Files land in the standard cache (`HF_HUB_CACHE`), where
the launcher and any other tool find them.
"""

import json
import logging
import sys
from pathlib import Path
from typing import Any

from .model_files import SAFETENSORS_INDEX, SERVING_FILES, convert_weights_hint, is_bin_weight_file

logger = logging.getLogger(__name__)

# How often a download's progress is logged when stderr is not a terminal.
PROGRESS_LOG_INTERVAL_S = 2.0


class DownloadError(Exception):
    """The model cannot be downloaded; the message says why in one line."""


def download_weights(repo_id: str, revision: str | None = None) -> Path:
    """Downloads what serving needs of repo_id at revision (default: the main branch) into
    the Hugging Face cache, unless it is there already, and returns the snapshot directory."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import logging as hf_logging

    # huggingface_hub prints its warnings itself; without this they would reach stderr twice.
    hf_logging.disable_propagation()
    try:
        return _download(repo_id, revision)
    except HFValidationError as error:
        raise DownloadError(
            f"`{repo_id}` is not a Hugging Face Hub repository id: {_first_line(error)}"
        ) from error
    except GatedRepoError as error:
        raise DownloadError(
            f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN "
            f"(the Hub answered {_status(error)})"
        ) from error
    except RevisionNotFoundError as error:
        raise DownloadError(
            f"{repo_id} has no revision `{revision or 'main'}` on the Hub"
        ) from error
    except RepositoryNotFoundError as error:
        raise DownloadError(
            f"{repo_id} is not a model repository on the Hub ({constants.ENDPOINT}); if it is "
            "private, set HF_TOKEN to a token that can read it"
        ) from error
    except HfHubHTTPError as error:
        raise DownloadError(f"the Hub refused {repo_id}: {_first_line(error)}") from error
    except OSError as error:
        raise DownloadError(f"cannot download {repo_id}: {_first_line(error)}") from error


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        files = _repo_files(HfApi(), repo_id, revision)
    except (HfHubHTTPError, HFValidationError):
        raise
    # Offline mode, or whatever huggingface_hub's HTTP library raises without network.
    except Exception as unreachable:  # noqa: BLE001
        return _cached_snapshot(repo_id, revision, unreachable)
    wanted = [name for name in SERVING_FILES if name in files]
    wanted += _weight_files(repo_id, revision, files)
    logger.info("downloading %s (%s): %s", repo_id, revision or "main", ", ".join(wanted))
    snapshot = snapshot_download(
        repo_id, revision=revision, allow_patterns=wanted, tqdm_class=_progress_class()
    )
    return Path(snapshot)


def _repo_files(api: Any, repo_id: str, revision: str | None) -> set[str]:
    """The files at the repository's top level (serving reads nothing in subfolders)."""
    info = api.model_info(repo_id, revision=revision)
    return {
        sibling.rfilename for sibling in info.siblings or [] if "/" not in sibling.rfilename
    }


def _weight_files(repo_id: str, revision: str | None, files: set[str]) -> list[str]:
    """The safetensors files to fetch: those the index names, else all of them. A repository
    without any is an error that says what to do."""
    from huggingface_hub import hf_hub_download

    if SAFETENSORS_INDEX in files:
        # Some repositories also ship a consolidated copy of the same weights: fetch only the
        # files the index names.
        index = Path(hf_hub_download(repo_id, SAFETENSORS_INDEX, revision=revision))
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise DownloadError(f"{repo_id}: cannot read {SAFETENSORS_INDEX}: {error}") from error
        return [SAFETENSORS_INDEX, *sorted(set(weight_map.values()))]
    safetensors = sorted(name for name in files if name.endswith(".safetensors"))
    if safetensors:
        return safetensors
    if any(is_bin_weight_file(name) for name in files):
        raise DownloadError(
            f"{convert_weights_hint(repo_id)} after downloading it "
            f"(`hf download {repo_id} --local-dir DIR`), then serve DIR"
        )
    raise DownloadError(f"{repo_id} has no safetensors weights at its top level")


def _cached_snapshot(repo_id: str, revision: str | None, unreachable: Exception) -> Path:
    """Without the Hub, a snapshot already in the cache still answers."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    why = (
        "HF_HUB_OFFLINE is set"
        if constants.HF_HUB_OFFLINE
        else f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} "
        f"({_first_line(unreachable)})"
    )
    try:
        snapshot = snapshot_download(
            repo_id, revision=revision, allow_patterns=["config.json"], local_files_only=True
        )
    except LocalEntryNotFoundError as error:
        raise DownloadError(
            f"{repo_id} (revision `{revision or 'main'}`) is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {why}"
        ) from error
    logger.info("%s: using %s from the Hugging Face cache", why, repo_id)
    return Path(snapshot)


def _progress_class() -> type:
    """huggingface_hub's progress bars on a terminal. In a log (the launcher's) tqdm would hide
    them, so there each bar becomes a plain line every few seconds."""
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import tqdm as hub_tqdm

    if sys.stderr.isatty():
        return hub_tqdm
    # Over plain HTTP this bar counts the same bytes as the snapshot's main one.
    disable_progress_bars("huggingface_hub.snapshot_download.transfer")

    class LoggedProgress(hub_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # HF_HUB_DISABLE_PROGRESS_BARS still wins: the parent class applies it.
            kwargs["disable"] = False
            kwargs["mininterval"] = PROGRESS_LOG_INTERVAL_S
            # What tqdm writes itself (line ends, cursor moves) is not for a log.
            kwargs["file"] = _Discard()
            super().__init__(*args, **kwargs)

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            # tqdm passes a message only to clear a bar's line, which a log has no use for.
            if msg is None:
                logger.info("%s", self.plain_line())
            return True

        def plain_line(self) -> str:
            done, total = self.n, self.total or 0
            desc = self.desc.rstrip(": ")
            percent = f"{100 * done / total:.0f}%" if total else "?"
            if self.unit == "B":
                size = self.format_sizeof
                return f"{desc}: {percent} ({size(done)}B of {size(total)}B)"
            return f"{desc}: {percent} ({done:.0f} of {total:.0f})"

    return LoggedProgress


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _status(error: Any) -> str:
    response = getattr(error, "response", None)
    return str(getattr(response, "status_code", "an error"))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
