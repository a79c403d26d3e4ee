"""`sluice-server convert-weights`: PyTorch `.bin` weights into safetensors.

The `.bin` files are pickles. They are read with `torch.load(weights_only=True)`, whose
unpickler builds tensors and plain containers only and refuses anything else, so converting a
downloaded checkpoint never runs code from it. Each `.bin` file becomes one safetensors file of
the same tensors (`pytorch_model-00001-of-00002.bin` -> `model-00001-of-00002.safetensors`),
with `model.safetensors.index.json` when there are several.
"""

import json
import logging
import os
import pickle
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model_files import (
    BIN_INDEX,
    BIN_PREFIX,
    SAFETENSORS_INDEX,
    SERVING_FILES,
    bin_weight_files,
)

logger = logging.getLogger(__name__)


class ConversionError(Exception):
    """The directory's weights cannot be converted; the message says why."""


def convert_weights(model_dir: Path, output_dir: Path | None = None) -> list[Path]:
    """Converts the `.bin` weights of model_dir into safetensors in output_dir (default:
    model_dir) and returns the files written. A separate output_dir also gets copies of the
    files serving reads (config, tokenizer, ...), so it is a model directory of its own."""
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir} is not a directory")
    sources = _bin_files(model_dir)
    output_dir = model_dir if output_dir is None else output_dir
    output_dir.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    weight_map: dict[str, str] = {}
    total_size = 0
    for source in sources:
        target = output_dir / safetensors_name(source.name)
        logger.info("converting %s into %s", source, target)
        tensors = _safetensors_ready(_load_state_dict(source))
        _save_atomically(tensors, target)
        _check_written(tensors, target)
        written.append(target)
        weight_map.update((name, target.name) for name in tensors)
        total_size += sum(tensor.nbytes for tensor in tensors.values())

    if len(written) > 1:
        index = output_dir / SAFETENSORS_INDEX
        index_content = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        _write_text_atomically(index, json.dumps(index_content, indent=2, sort_keys=True) + "\n")
        written.append(index)
    if output_dir.resolve() != model_dir.resolve():
        written.extend(_copy_serving_files(model_dir, output_dir))
    return written


def safetensors_name(bin_name: str) -> str:
    """`pytorch_model-00001-of-00002.bin` -> `model-00001-of-00002.safetensors`."""
    stem = bin_name.removesuffix(".bin")
    if stem.startswith(BIN_PREFIX):
        stem = "model" + stem.removeprefix(BIN_PREFIX)
    return stem + ".safetensors"


def _bin_files(model_dir: Path) -> list[Path]:
    # With an index, only the files it names; without, every pytorch_model*.bin.
    index = model_dir / BIN_INDEX
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConversionError(f"cannot read {index}: {error}") from error
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise ConversionError(f"{index} names files that are missing: {', '.join(missing)}")
        return files
    files = bin_weight_files(model_dir)
    if not files:
        raise ConversionError(f"{model_dir} has no pytorch_model*.bin files to convert")
    return files


def _load_state_dict(source: Path) -> dict[str, torch.Tensor]:
    # mmap keeps a large shard out of memory; files in torch's pre-1.6 format cannot be mapped.
    mmap = zipfile.is_zipfile(source)
    try:
        loaded = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConversionError(
            f"{source} holds more than tensors, so it was not loaded (only tensors are read "
            f"from .bin files, never code): {first_line}"
        ) from error
    except (OSError, RuntimeError, EOFError) as error:
        raise ConversionError(f"cannot read {source}: {error}") from error
    if not isinstance(loaded, dict) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in loaded.items()
    ):
        raise ConversionError(f"{source} is not a state dict (a mapping of names to tensors)")
    return loaded


def _safetensors_ready(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores each tensor on its own: tensors that share storage (tied embeddings
    saved once by torch) get their own copy, and views are made contiguous."""
    users = Counter(tensor.untyped_storage().data_ptr() for tensor in state_dict.values())
    return {
        name: (
            tensor.clone(memory_format=torch.contiguous_format)
            if users[tensor.untyped_storage().data_ptr()] > 1
            else tensor.contiguous()
        )
        for name, tensor in state_dict.items()
    }


def _save_atomically(tensors: dict[str, torch.Tensor], target: Path) -> None:
    # "format": "pt" is what transformers expects of a PyTorch safetensors file.
    partial = target.with_name(target.name + ".partial")
    try:
        save_file(tensors, partial, metadata={"format": "pt"})
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _check_written(tensors: dict[str, torch.Tensor], target: Path) -> None:
    with safe_open(target, framework="pt") as written:
        names = set(written.keys())
        if names != set(tensors):
            raise ConversionError(f"{target} does not hold the tensors it was given")
        for name, tensor in tensors.items():
            stored = written.get_tensor(name)
            if (
                stored.dtype != tensor.dtype
                or stored.shape != tensor.shape
                or not torch.equal(_bytes_of(stored), _bytes_of(tensor))
            ):
                raise ConversionError(f"{target}: tensor {name} differs from its source")


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    # Compared as bytes, so that NaNs in a checkpoint compare equal to themselves.
    return tensor.reshape(-1).view(torch.uint8)


def _write_text_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _copy_serving_files(model_dir: Path, output_dir: Path) -> list[Path]:
    copied = []
    for name in SERVING_FILES:
        source = model_dir / name
        if source.is_file():
            copied.append(Path(shutil.copy2(source, output_dir / name)))
    return copied
