"""Shared fixtures: tiny random Hugging Face models saved to disk, Sluice loaded from them, and
the compiled CPU kernels.

`--kernel-builds` chooses the kernel builds test_cpu_kernels.py runs against (default: native,
avx512 where the CPU has AMX, avx2 and portable, see sluice_server.kernels.build);
test_kernel_builds.py reruns those tests with `--kernel-builds native-sanitized` under
AddressSanitizer.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Without a GPU, Triton's kernels run on CPU tensors under its interpreter
# (test_triton_quantized.py). Triton reads the switch when it is first imported, which
# bitsandbytes and transformers do, so it is set before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from sluice_server.kernels import CpuFeatures, KernelBuild, Kernels
from sluice_server.models.loader import LoadedModel, load_model

TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    # Larger than the default 0.02, so that logits are spread out and greedy choices are not
    # near-ties that floating-point noise could flip.
    "initializer_range": 0.2,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

SaveTinyModel = Callable[..., tuple[Path, torch.nn.Module]]

# model_type -> (transformers module -> (its config class, its causal-LM class)).
MODEL_CLASSES: dict[str, Callable[[Any], tuple[type, type]]] = {
    "llama": lambda t: (t.LlamaConfig, t.LlamaForCausalLM),
    "mistral": lambda t: (t.MistralConfig, t.MistralForCausalLM),
    "qwen2": lambda t: (t.Qwen2Config, t.Qwen2ForCausalLM),
    "qwen3": lambda t: (t.Qwen3Config, t.Qwen3ForCausalLM),
    "phi3": lambda t: (t.Phi3Config, t.Phi3ForCausalLM),
    "gemma2": lambda t: (t.Gemma2Config, t.Gemma2ForCausalLM),
    "gemma3_text": lambda t: (t.Gemma3TextConfig, t.Gemma3ForCausalLM),
    "mixtral": lambda t: (t.MixtralConfig, t.MixtralForCausalLM),
    "qwen2_moe": lambda t: (t.Qwen2MoeConfig, t.Qwen2MoeForCausalLM),
    "qwen3_moe": lambda t: (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM),
}

# The cache `sluice-server build-kernels` and the shard use.
KERNEL_CACHE_DIR = Path.home() / ".cache" / "sluice" / "kernels"
DEFAULT_KERNEL_BUILDS = "native,avx512,avx2,portable"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kernel-builds",
        default=DEFAULT_KERNEL_BUILDS,
        help="comma-separated kernel builds for test_cpu_kernels.py: native, avx512, avx2, "
        "portable, each optionally with -sanitized (AddressSanitizer and UBSan; libasan must be "
        "preloaded)",
    )


def parse_kernel_build(name: str) -> KernelBuild:
    isa, _, suffix = name.partition("-")
    if suffix not in ("", "sanitized"):
        raise pytest.UsageError(f"unknown kernel build {name!r}")
    return KernelBuild(isa, sanitize=suffix == "sanitized")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kernel_build" in metafunc.fixturenames:
        names = metafunc.config.getoption("--kernel-builds").split(",")
        metafunc.parametrize(
            "kernel_build", [parse_kernel_build(n) for n in names], ids=names, scope="session"
        )


@pytest.fixture(scope="session")
def save_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> SaveTinyModel:
    """Returns a function that saves a random transformers model and gives (directory, model)."""

    def save(model_type: str = "llama", **overrides: Any) -> tuple[Path, torch.nn.Module]:
        import transformers

        config_class, model_class = MODEL_CLASSES[model_type](transformers)
        torch.manual_seed(0)
        config = config_class(**{**TINY_CONFIG, **overrides})
        # The eager implementation is transformers' plain reference: its others may leave out
        # what one of them does not support (soft-capping, say).
        config._attn_implementation = "eager"
        model = model_class(config).eval()
        with torch.no_grad():
            # Norms start at 1 (or, for Gemma, at the stored 0 of 1 + w): spread them, so that a
            # norm loaded wrongly shows.
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.2)
        directory = tmp_path_factory.mktemp(f"tiny-{model_type}")
        model.save_pretrained(directory)
        return directory, model

    return save


@pytest.fixture(scope="session")
def tiny_llama(save_tiny_model: SaveTinyModel) -> tuple[Path, torch.nn.Module]:
    return save_tiny_model("llama", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_llama: tuple[Path, torch.nn.Module]) -> LoadedModel:
    return load_model(tiny_llama[0], torch.float32, torch.device("cpu"), Kernels.reference())


@pytest.fixture(scope="session")
def cpu() -> CpuFeatures:
    return CpuFeatures.detect()


@pytest.fixture(scope="session")
def compiled_kernels() -> Kernels:
    """The C++ CPU kernels as the shard serves with them (built for this CPU)."""
    return Kernels.compiled_cpu(KERNEL_CACHE_DIR)


@pytest.fixture(scope="session")
def built_kernels(kernel_build: KernelBuild, cpu: CpuFeatures) -> Kernels:
    """The kernels of one of the `--kernel-builds`; skipped, saying why, where it cannot run."""
    reason = kernel_build.unrunnable_reason(cpu)
    if reason is not None:
        pytest.skip(reason)
    return Kernels.compiled_cpu(KERNEL_CACHE_DIR, kernel_build)
