"""The files of a model directory: which ones serving reads, and how weights are laid out.

Serving reads config.json, the tokenizer, the generation config, the chat template and
safetensors weights. PyTorch `.bin` weights are never loaded for serving (unpickling can run
code); `sluice-server convert-weights` turns them into safetensors.
"""

from pathlib import Path

# Everything serving reads besides the weights. Files a repository lacks are skipped.
SERVING_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_PREFIX = "pytorch_model"


def is_bin_weight_file(name: str) -> bool:
    """`pytorch_model.bin` or a shard of it (`pytorch_model-00001-of-00002.bin`)."""
    return name.startswith(BIN_PREFIX) and name.endswith(".bin")


def bin_weight_files(model_dir: Path) -> list[Path]:
    """Every `pytorch_model*.bin` in a directory."""
    return sorted(path for path in model_dir.iterdir() if is_bin_weight_file(path.name))


def convert_weights_hint(model_dir: Path | str) -> str:
    """What to tell a user whose model has PyTorch weights only."""
    return (
        f"{model_dir} has PyTorch .bin weights only, and Sluice loads safetensors: convert them "
        f"with `sluice-server convert-weights {model_dir}`"
    )
