"""Reads checkpoint tensors from a directory of safetensors files (never pickle).

Names are looked up without the `model.` prefix that Hugging Face causal-LM checkpoints put on
everything but the LM head: `layers.0.mlp.up_proj.weight` finds `model.layers.0.mlp.up_proj.weight`.

A projection a checkpoint holds quantized (AWQ, GPTQ, FP8) is read as it is with `quantized`;
read as a tensor (`get`, `rows`, `columns`), it is dequantized, for the layers that cannot hold
it quantized. With a method that quantizes at load (`--quantize fp8`, bitsandbytes'), `quantized`
gives the projections quantized and the tensors read as stored.
"""

import json
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch
from safetensors import safe_open

from .model_files import SAFETENSORS_INDEX, bin_weight_files, convert_weights_hint
from .quant import QuantizedWeight
from .quant.at_load import LoadTimeQuantizer
from .quant.checkpoint import CheckpointQuantization, PackedQuantizedTensors

PREFIX = "model."
# safetensors' names of the dtypes a checkpoint stores quantized codes in (FP8 checkpoints).
_CODE_DTYPES = ("F8_E4M3", "F8_E5M2")


class QuantizedTensors(Protocol):
    """Where a checkpoint's quantized projections come from (quant.gguf), by full tensor name."""

    def get(self, name: str) -> QuantizedWeight | None: ...

    def holds(self, name: str) -> bool: ...


class CheckpointWeights:
    """Lazy access to the tensors of a checkpoint directory; use as a context manager.

    Its quantized projections come from `quantized` (a GGUF file beside the directory), from its
    own files for a checkpoint quantized with `packing`, or from quantizing them with `at_load`
    (a `--quantize` method)."""

    def __init__(
        self,
        model_dir: Path,
        quantized: QuantizedTensors | None = None,
        packing: CheckpointQuantization | None = None,
        at_load: str | None = None,
    ) -> None:
        files = _checkpoint_files(model_dir)
        if packing is not None:
            quantized = PackedQuantizedTensors(packing, self)
        elif at_load is not None:
            quantized = LoadTimeQuantizer(at_load, self)
        self._quantized = quantized
        # The projection last read dequantized: a layer reads one's shape, then its rows or
        # columns, which would otherwise read and unpack it each time.
        self._last_dequantized: tuple[str, torch.Tensor] | None = None
        self._exit_stack = ExitStack()
        # name without prefix -> (open file, name in that file)
        self._locations: dict[str, tuple[Any, str]] = {}
        for file in files:
            handle = self._exit_stack.enter_context(safe_open(file, framework="pt"))
            stored_names: list[str] = handle.keys()
            for stored_name in stored_names:
                name = stored_name.removeprefix(PREFIX)
                self._locations[name] = (handle, stored_name)

    # typing.Self needs Python 3.11; Sluice supports 3.10.
    def __enter__(self) -> "CheckpointWeights":  # noqa: PYI034
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._last_dequantized = None
        self._exit_stack.close()

    def __contains__(self, name: str) -> bool:
        return name.removeprefix(PREFIX) in self._locations

    def get(self, name: str) -> torch.Tensor:
        if self._only_quantized(name):
            return self._dequantized(name)
        return self.stored(name)

    def stored(self, name: str) -> torch.Tensor:
        """The tensor as the checkpoint stores it (a quantized projection's codes too)."""
        handle, stored_name = self._location(name)
        return handle.get_tensor(stored_name)

    def _location(self, name: str) -> tuple[Any, str]:
        try:
            return self._locations[name.removeprefix(PREFIX)]
        except KeyError:
            raise KeyError(f"checkpoint has no tensor {name!r}") from None

    def _only_quantized(self, name: str) -> bool:
        """Whether the checkpoint holds `name` quantized only: packed under other names (AWQ,
        GPTQ) or as FP8 codes."""
        if not self.holds_quantized(name):
            return False
        if name not in self:
            return True
        handle, stored_name = self._location(name)
        return handle.get_slice(stored_name).get_dtype() in _CODE_DTYPES

    def _dequantized(self, name: str) -> torch.Tensor:
        if self._last_dequantized is None or self._last_dequantized[0] != name:
            weight = self.quantized(name)
            assert weight is not None  # _only_quantized checked it
            self._last_dequantized = (name, weight.dequantize())
        return self._last_dequantized[1]

    def shape(self, name: str) -> tuple[int, ...]:
        if self._only_quantized(name):
            return tuple(self._dequantized(name).shape)
        return self.stored_shape(name)

    def stored_shape(self, name: str) -> tuple[int, ...]:
        handle, stored_name = self._location(name)
        return tuple(handle.get_slice(stored_name).get_shape())

    def check_shape(self, name: str, expected: tuple[int, ...]) -> None:
        """Refuses, by name, a tensor whose shape is not what the model expects."""
        if self.shape(name) != expected:
            raise ValueError(
                f"{name}: checkpoint shape {self.shape(name)}, model expects {expected}"
            )

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (entries, for a vector); only those are read from the
        memory-mapped file."""
        if self._only_quantized(name):
            return self._dequantized(name)[start:stop]
        handle, stored_name = self._location(name)
        return handle.get_slice(stored_name)[start:stop]

    def columns(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop) of a matrix."""
        if self._only_quantized(name):
            return self._dequantized(name)[:, start:stop]
        handle, stored_name = self._location(name)
        return handle.get_slice(stored_name)[:, start:stop]

    def quantized(self, name: str) -> QuantizedWeight | None:
        """The projection weight `name` as the checkpoint quantized it, or None where it is held
        unquantized (read it with `rows`/`columns`)."""
        if self._quantized is None:
            return None
        return self._quantized.get(_full_name(name))

    def holds_quantized(self, name: str) -> bool:
        """Whether `quantized(name)` gives a weight, without reading it."""
        return self._quantized is not None and self._quantized.holds(_full_name(name))

    def lm_head_is_tied(self, tie_word_embeddings: bool) -> bool:
        """Whether the LM head reuses the embedding matrix.

        Tied checkpoints usually omit `lm_head.weight`; treat a missing one as tied too.
        """
        head = "lm_head.weight"
        return tie_word_embeddings or (head not in self and not self.holds_quantized(head))


def _full_name(name: str) -> str:
    return name if name.startswith("lm_head.") else PREFIX + name


def _checkpoint_files(model_dir: Path) -> list[Path]:
    # With an index, only the files it names: some repositories also ship a consolidated copy
    # of the same weights under other names.
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files and bin_weight_files(model_dir):
        raise FileNotFoundError(convert_weights_hint(model_dir))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def copy_checked(parameter: torch.Tensor | None, tensor: torch.Tensor, name: str) -> None:
    """Copies a checkpoint tensor into a model parameter, refusing a shape mismatch by name."""
    if parameter is None:
        raise ValueError(f"{name}: the model has no parameter for it")
    if parameter.shape != tensor.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)}, "
            f"model expects {tuple(parameter.shape)}"
        )
    parameter.copy_(tensor)
