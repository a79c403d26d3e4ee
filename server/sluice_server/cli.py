"""The `sluice-server` command: serve a model, build the CPU kernels, download a model from the
Hugging Face Hub, convert PyTorch weights or a GGUF file, find the default model's GGUF.

Heavy modules (torch, grpc, transformers) are imported inside the subcommands that need them, so
`sluice-server default-model-gguf` answers at once.
"""

import argparse
import asyncio
import logging
import os
import re
import signal
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .logs import setup_logging

if TYPE_CHECKING:
    import torch

    from .layers.tensor_parallel import Rendezvous
    from .service import TextGenerationServicer

logger = logging.getLogger("sluice_server")

# Seconds in-flight calls get to finish after SIGTERM/SIGINT.
SHUTDOWN_GRACE_S = 2.0

_MEMORY_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory_size(text: str) -> int:
    """Bytes in "2GB", "1.5GiB", "512MB" or "1048576".

    KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _MEMORY_UNITS:
        raise argparse.ArgumentTypeError(
            f"not a memory size: {text!r} (examples: 2GB, 512MiB, 1073741824)"
        )
    return int(float(match.group(1)) * _MEMORY_UNITS[unit])


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice-server", description="Sluice model shard.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model directory over gRPC on a unix socket")
    serve.add_argument("model_dir", type=Path, help="directory with config.json and *.safetensors")
    listen = serve.add_mutually_exclusive_group(required=True)
    listen.add_argument("--uds-path", help="unix socket path to listen on")
    listen.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="TCP address to listen on instead, for a router on another machine (no "
        "authentication: a private network only)",
    )
    serve.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto: bfloat16 on CUDA and on CPUs with native bfloat16 (AVX512-BF16, AMX), "
        "float32 on other CPUs",
    )
    serve.add_argument(
        "--gguf-file",
        type=Path,
        default=None,
        help="the GGUF file model_dir was converted from: serve the projections it holds in "
        "Q4_0, Q4_1, Q8_0, Q4_K or Q6_K as stored, multiplied by the quantized kernel, instead of "
        "model_dir's dequantized copies (the launcher's --quantize gguf)",
    )
    serve.add_argument(
        "--quantize",
        default=None,
        metavar="{awq,gptq,fp8,bitsandbytes,bitsandbytes-nf4,bitsandbytes-fp4}",
        help="awq, gptq: the method the checkpoint must be quantized with (without it, a "
        "checkpoint whose config.json names awq, gptq or fp8 is served quantized all the same); "
        "fp8 and bitsandbytes': quantize an unquantized checkpoint's projections at load (an FP8 "
        "checkpoint is served as stored)",
    )
    serve.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: CUDA when available",
    )
    serve.add_argument(
        "--kv-cache-memory",
        type=parse_memory_size,
        default=None,
        help="memory for the KV cache, e.g. 2GB (default: a share of what is available)",
    )
    serve.add_argument(
        "--kv-cache-dtype",
        choices=["fp8_e4m3fn", "fp8_e5m2"],  # engine.kv_cache.KV_CACHE_DTYPES
        default=None,
        help="store keys and values as 8-bit floats, divided by the checkpoint's KV scales where "
        "it has them: twice the tokens in the same memory, half the bytes read per decode step, "
        "at some accuracy (default: the model's dtype)",
    )
    serve.add_argument(
        "--block-size", type=_positive_int, default=16, help="tokens per KV cache block"
    )
    serve.add_argument(
        "--kernels",
        choices=["auto", "compiled", "reference"],
        default="auto",
        help="auto: Sluice's compiled C++ kernels on CPU (built on first use), its Triton "
        "kernels for quantized weights on CUDA, PyTorch's operators elsewhere or if they cannot "
        "be built; compiled: fail rather than fall back",
    )
    serve.add_argument(
        "--collective-timeout",
        type=_positive_int,
        default=120,
        help="seconds after which a tensor-parallel collective that cannot complete (a rank "
        "died or hangs) fails the step",
    )
    serve.add_argument(
        "--otlp-endpoint",
        default=None,
        help="export OpenTelemetry traces of each step to this OTLP/gRPC collector, e.g. "
        "http://127.0.0.1:4317 (default: no tracing)",
    )
    serve.add_argument(
        "--otlp-service-name",
        default=None,
        help="the service name of the exported spans (default: text-generation-inference.server)",
    )
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per line (level, logger, message), for a launcher to read",
    )
    _add_kernel_cache_argument(serve)
    serve.set_defaults(handler=_serve)

    build_kernels = commands.add_parser(
        "build-kernels", help="compile the CPU kernels for this machine ahead of the first serve"
    )
    _add_kernel_cache_argument(build_kernels)
    build_kernels.set_defaults(handler=_build_kernels)

    convert = commands.add_parser(
        "convert-gguf", help="convert a GGUF file into a safetensors model directory"
    )
    convert.add_argument("gguf_file", type=Path)
    convert.add_argument("out_dir", type=Path)
    convert.set_defaults(handler=_convert_gguf)

    download = commands.add_parser(
        "download-weights",
        help="download what serving needs of a Hugging Face Hub model into the Hugging Face "
        "cache and print its directory (HF_TOKEN, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT "
        "apply)",
    )
    download.add_argument("model_id", help="a Hub repository id, e.g. HuggingFaceTB/SmolLM2-135M")
    download.add_argument(
        "--revision", default=None, help="a branch, tag or commit hash (default: main)"
    )
    download.set_defaults(handler=_download_weights)

    convert_weights = commands.add_parser(
        "convert-weights",
        help="convert a model directory's PyTorch weights (pytorch_model*.bin) into safetensors; "
        "only tensors are read from them, never code",
    )
    convert_weights.add_argument("model_dir", type=Path)
    convert_weights.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where to write the safetensors files, with copies of the config and tokenizer "
        "files (default: next to the .bin files)",
    )
    convert_weights.set_defaults(handler=_convert_weights)

    default_model = commands.add_parser(
        "default-model-gguf", help="print the path of the default model's GGUF file"
    )
    default_model.set_defaults(handler=_default_model_gguf)
    return parser


def _add_kernel_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kernel-cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "sluice" / "kernels",
        help="where compiled kernels are built and cached",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_format", "text"))
    return args.handler(args)


def _fail(message: str) -> int:
    print(f"sluice-server: error: {message}", file=sys.stderr)
    return 1


def _default_model_gguf(args: argparse.Namespace) -> int:
    from .gguf_files import default_gguf_path

    try:
        print(default_gguf_path())
    except FileNotFoundError as error:
        return _fail(str(error))
    return 0


def _convert_gguf(args: argparse.Namespace) -> int:
    from .gguf_files import convert_gguf

    try:
        convert_gguf(args.gguf_file, args.out_dir)
    except Exception as error:  # noqa: BLE001 - any failure of the converter is the user's answer
        return _fail(f"cannot convert {args.gguf_file}: {error}")
    return 0


def _download_weights(args: argparse.Namespace) -> int:
    from .hub import DownloadError, download_weights

    try:
        snapshot = download_weights(args.model_id, args.revision)
    except DownloadError as error:
        return _fail(str(error))
    # The last line of stdout is the answer the launcher reads.
    print(snapshot, flush=True)
    return 0


def _convert_weights(args: argparse.Namespace) -> int:
    from .convert_weights import ConversionError, convert_weights

    try:
        written = convert_weights(args.model_dir, args.output_dir)
    except ConversionError as error:
        return _fail(str(error))
    for path in written:
        logger.info("wrote %s", path)
    return 0


def _build_kernels(args: argparse.Namespace) -> int:
    from .kernels import KernelBuildError, load_cpu_kernels

    try:
        module = load_cpu_kernels(args.kernel_cache_dir)
    except (KernelBuildError, ValueError) as error:
        return _fail(str(error))
    print(module.__file__)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import torch

    from .engine.kv_cache import KV_CACHE_DTYPES
    from .engine.step import StepExecutor
    from .kernels import KernelBuildError, select_kernels
    from .kernels.cpu_features import MAX_ISA_VARIABLE, CpuFeatures
    from .layers.tensor_parallel import join_group
    from .models.loader import ModelLoadError, load_model
    from .service import TextGenerationServicer
    from .tracing import DEFAULT_SERVICE_NAME, setup_tracing

    try:
        rendezvous = _rendezvous_from_env(args.collective_timeout)
    except ValueError as error:
        return _fail(str(error))
    device_type = args.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda, but CUDA is not available")
    if device_type == "cuda":
        # One GPU per rank on its node.
        local_rank = int(os.environ.get("LOCAL_RANK", rendezvous.rank))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        try:
            cpu = CpuFeatures.detect()
        except ValueError as error:
            return _fail(str(error))
        if cpu.max_isa is not None:
            logger.info(
                "%s=%s: CPU paths and kernels for %s",
                MAX_ISA_VARIABLE,
                cpu.max_isa,
                "x86-64-v3 (AVX2, no AVX-512)" if cpu.max_isa == "avx2" else "plain x86-64",
            )
        if rendezvous.world_size > 1:
            # The ranks share the host's cores rather than each claiming them all.
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // rendezvous.world_size))
    logger.info("rank %d of %d on %s", rendezvous.rank, rendezvous.world_size, device)
    try:
        shards = join_group(rendezvous, device)
    except (RuntimeError, ValueError) as error:
        address = f"{rendezvous.master_addr}:{rendezvous.master_port}"
        return _fail(f"cannot join the other ranks at {address}: {error}")
    try:
        kernels = select_kernels(args.kernels, device, args.kernel_cache_dir)
    except KernelBuildError as error:
        return _fail(str(error))
    logger.info("kernels: %s", kernels.describe())
    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = default_dtype_name(device, kernels.compiled)
    dtype: torch.dtype = getattr(torch, dtype_name)
    _warn_if_bf16_is_emulated(device, dtype_name, kernels.compiled)

    logger.info("loading %s on %s in %s", args.model_dir, device, dtype_name)
    if args.gguf_file is not None:
        logger.info("serving the projections of %s quantized as stored", args.gguf_file)
    try:
        loaded = load_model(
            args.model_dir, dtype, device, kernels, shards, args.gguf_file, args.quantize
        )
    except ModelLoadError as error:
        return _fail(str(error))
    logger.info(
        "loaded %s: %d layers, vocab %d, eos %s; rank %d holds %.1f MiB of weights",
        loaded.config.model_type,
        loaded.config.num_layers,
        loaded.config.vocab_size,
        list(loaded.eos_token_ids),
        rendezvous.rank,
        loaded.weight_bytes / 2**20,
    )
    otlp_endpoint = args.otlp_endpoint or None
    tracing = setup_tracing(
        otlp_endpoint, args.otlp_service_name or DEFAULT_SERVICE_NAME, rendezvous.rank
    )
    if otlp_endpoint is not None:
        logger.info("exporting traces to %s", args.otlp_endpoint)
    kv_cache_dtype = KV_CACHE_DTYPES[args.kv_cache_dtype] if args.kv_cache_dtype else None
    executor = StepExecutor(
        loaded, args.block_size, args.kv_cache_memory, tracing.tracer, kv_cache_dtype
    )
    servicer = TextGenerationServicer(executor)
    # grpc wants an absolute path after unix://
    uds_path = os.path.abspath(args.uds_path) if args.uds_path else None
    address = f"unix://{uds_path}" if uds_path else args.listen
    try:
        asyncio.run(_serve_until_signal(servicer, address, uds_path))
    except (OSError, RuntimeError) as error:
        return _fail(f"cannot serve on {address}: {error}")
    finally:
        # The spans still buffered, exported before the process exits.
        tracing.shutdown()
    return 0


def _rendezvous_from_env(timeout_s: int) -> "Rendezvous":
    """The rank's place in the group from torch.distributed's variables (the launcher sets
    them); without them, a single shard."""
    from datetime import timedelta

    from .layers.tensor_parallel import Rendezvous

    try:
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        master_port = int(os.environ.get("MASTER_PORT", "29500"))
    except ValueError as error:
        raise ValueError(f"RANK, WORLD_SIZE and MASTER_PORT must be integers: {error}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not a rank of WORLD_SIZE={world_size}")
    return Rendezvous(
        rank=rank,
        world_size=world_size,
        master_addr=os.environ.get("MASTER_ADDR", "localhost"),
        master_port=master_port,
        timeout=timedelta(seconds=timeout_s),
    )


async def _serve_until_signal(
    servicer: "TextGenerationServicer", address: str, uds_path: str | None
) -> None:
    """Serves on `address` until SIGTERM/SIGINT; `uds_path`: the socket file to clear."""
    from .service import create_server

    if uds_path:
        _remove_stale_socket(uds_path)
    server = create_server(servicer, address)
    await server.start()
    logger.info("Server ready on %s", address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    await stop.wait()
    logger.info("shutting down")
    await server.stop(grace=SHUTDOWN_GRACE_S)
    if uds_path:
        _remove_stale_socket(uds_path)
    logger.info("stopped")


def default_dtype_name(device: "torch.device", compiled_kernels: bool) -> str:
    """bfloat16 on GPUs and on CPUs where it serves faster than float32 (native bfloat16, or
    Sluice's compiled matmul on AVX2 CPUs without AVX-512: a decode step 1.3x faster at 32
    sequences and 1.7x at one, docs/microbenchmarks.md); float32 on other CPUs, where bfloat16
    is emulated and slower."""
    if device.type == "cuda":
        return "bfloat16"
    from .kernels.cpu_features import CpuFeatures

    return CpuFeatures.detect().default_dtype_name(compiled_kernels)


def _warn_if_bf16_is_emulated(
    device: "torch.device", dtype_name: str, compiled_kernels: bool
) -> None:
    if device.type != "cpu" or dtype_name != "bfloat16":
        return
    from .kernels.cpu_features import CpuFeatures

    note = CpuFeatures.detect().bf16_slow_path_note(compiled_kernels)
    if note is not None:
        logger.warning("%s", note)


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a previous run would make binding fail."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
