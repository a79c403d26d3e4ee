#!/usr/bin/env bash
# Checks Sluice on a CUDA GPU: the CUDA unit tests, the quantized-weight kernels' timings, then
# the real launcher, router and shard end to end with a throughput measurement (unquantized, AWQ
# and FP8), then the CPU-side engine and kernel tests. See docs/gpu.md.
#
# Run from the repository root of a checkout where `make install` ran:  bash scripts/gpu_check.sh
# Each input is an environment variable with a default for such a checkout:
#   PYTHON=.venv/bin/python        an interpreter with Sluice's Python dependencies (torch with CUDA)
#   SLUICE_BINARIES=.venv/bin      where sluice-launcher and sluice-router are
#   SLUICE_MODEL_SRC=~/.cache/sluice/models/SmolLM2-135M-Instruct
#                                  a directory with SmolLM2-135M's config.json and tokenizer files
#                                  (weights are not needed: the end-to-end model is random)
#   SLUICE_WHEELS=                 a folder of wheels to install into /tmp/site first, for a
#                                  machine whose packages differ from requirements/runtime.txt
# Writes gpu_check.log, junit-cuda.xml, results.json and the launcher logs into $OUT (default
# ./gpu-check-out); exits non-zero if any phase failed.
set -uo pipefail

REPO=$(pwd)
OUT=${OUT:-$REPO/gpu-check-out}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
SLUICE_WHEELS=${SLUICE_WHEELS:-}
SLUICE_BINARIES=${SLUICE_BINARIES:-$REPO/.venv/bin}
SLUICE_MODEL_SRC=${SLUICE_MODEL_SRC:-$HOME/.cache/sluice/models/SmolLM2-135M-Instruct}
# Each phase stops at its own limit and the whole run by DEADLINE_S seconds, so that a hung phase
# cannot stall the check and everything written so far is kept.
DEADLINE_S=${DEADLINE_S:-600}
CUDA_TESTS_TIMEOUT_S=${CUDA_TESTS_TIMEOUT_S:-180}
E2E_TIMEOUT_S=${E2E_TIMEOUT_S:-300}
CPU_TESTS_TIMEOUT_S=${CPU_TESTS_TIMEOUT_S:-150}
E2E_ARGS=${E2E_ARGS:---quantize awq fp8}
KERNEL_BENCH_TIMEOUT_S=${KERNEL_BENCH_TIMEOUT_S:-180}
KERNEL_BENCH_ARGS=${KERNEL_BENCH_ARGS:---sweep}
# Phases to leave out, by name (a rerun of the ones that failed, say).
SKIP_PHASES=${SKIP_PHASES:-}
WORK=/tmp/sluice-gpu-check

mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/gpu_check.log") 2>&1

declare -A STATUS=()
PHASES=()

phase() {
    local name=$1
    shift
    if [[ " $SKIP_PHASES " == *" $name "* ]]; then
        echo "=== $name: skipped (SKIP_PHASES)"
        return
    fi
    local started=$SECONDS
    echo "=== $name: started at $(date +%T)"
    "$@"
    local code=$?
    echo "=== $name: exit $code after $((SECONDS - started))s"
    STATUS[$name]=$code
    PHASES+=("$name")
}

install_wheels() {
    [ -n "$SLUICE_WHEELS" ] || return 0
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$SLUICE_WHEELS"/*.whl || return
    export PYTHONPATH=/tmp/site
}

# The launcher looks for sluice-server beside itself, then on PATH; this one runs the shard from
# the working tree's server/ with $PYTHON.
install_binaries() {
    local bin=$WORK/bin
    mkdir -p "$bin"
    cp "$SLUICE_BINARIES/sluice-launcher" "$SLUICE_BINARIES/sluice-router" "$bin/" || return
    cat >"$bin/sluice-server" <<EOF
#!/bin/sh
PYTHONPATH="$REPO/server\${PYTHONPATH:+:\$PYTHONPATH}" exec "$PYTHON" -m sluice_server "\$@"
EOF
    chmod +x "$bin/sluice-server"
    export PATH="$bin:$PATH"
}

versions() {
    nvidia-smi || echo "no nvidia-smi"
    # The GPU path is bound by the host's kernel launches (docs/gpu.md): record the host CPU too.
    echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) CPUs"
    sluice-launcher --version
    "$PYTHON" - <<'EOF'
import grpc, google.protobuf, safetensors, tokenizers, torch, transformers
print("python packages:", {m.__name__: m.__version__ for m in (
    torch, transformers, grpc, google.protobuf, safetensors, tokenizers)})
print("cuda available:", torch.cuda.is_available(), "torch cuda:", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
EOF
}

# The smaller of a phase's own limit and the time left before the deadline; at least 1 (for
# `timeout`, 0 means no limit).
limit() {
    local left=$((DEADLINE_S - SECONDS))
    left=$((left < $1 ? left : $1))
    echo $((left < 1 ? 1 : left))
}

with_server_path() {
    PYTHONPATH="$REPO/server${PYTHONPATH:+:$PYTHONPATH}" "$@"
}

cuda_tests() {
    with_server_path timeout "$(limit "$CUDA_TESTS_TIMEOUT_S")" "$PYTHON" -m pytest -q -rs --tb=short \
        -p no:cacheprovider -o junit_family=xunit1 --junitxml="$OUT/junit-cuda.xml" \
        server/tests/test_cuda.py server/tests/test_triton_quantized.py
}

end_to_end() {
    # shellcheck disable=SC2086  # E2E_ARGS is a list of flags.
    timeout "$(limit "$E2E_TIMEOUT_S")" "$PYTHON" scripts/gpu_e2e.py \
        --model-src "$SLUICE_MODEL_SRC" --work "$WORK/e2e" --results "$OUT/results.json" $E2E_ARGS
    local code=$?
    for log in "$WORK"/e2e/launcher-*.log; do
        [ -f "$log" ] && tail -c 4000000 "$log" >"$OUT/$(basename "$log")"
    done
    return $code
}

# The quantized projections' kernels against bfloat16's matmul, after a sweep of tile shapes.
quantized_kernel_bench() {
    # shellcheck disable=SC2086  # KERNEL_BENCH_ARGS is a list of flags.
    with_server_path timeout "$(limit "$KERNEL_BENCH_TIMEOUT_S")" "$PYTHON" \
        benchmark/quantized_gpu.py $KERNEL_BENCH_ARGS --out "$OUT/quantized_gpu.json"
}

# The engine's CPU tests (test_models_vs_transformers.py also builds the C++ CPU kernels). The
# serve-command tests start `python -m sluice_server` with PYTHONPATH set to server/ alone, so
# they would miss the wheels in /tmp/site and meet the machine's own grpcio.
cpu_tests() {
    with_server_path timeout "$(limit "$CPU_TESTS_TIMEOUT_S")" "$PYTHON" -m pytest -q \
        --tb=short -p no:cacheprovider server/tests/test_step.py server/tests/test_service.py \
        server/tests/test_models_vs_transformers.py -k "not serve_command"
}

# The compiled CPU kernels against the reference on the host CPU, in a phase of their own, so
# that a crash in native code cannot take the other CPU tests' results down with it: first
# built with AddressSanitizer and UBSan (test_kernel_builds.py), which report a memory error
# with its stack, then as served, each in a process of its own.
cpu_kernel_tests() {
    local code=0
    for tests in server/tests/test_kernel_builds.py server/tests/test_cpu_kernels.py; do
        with_server_path timeout "$(limit "$CPU_TESTS_TIMEOUT_S")" "$PYTHON" -m pytest -q \
            --tb=short -p no:cacheprovider "$tests" || code=$?
    done
    return $code
}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
phase install_wheels install_wheels
phase install_binaries install_binaries
phase versions versions
phase cuda_tests cuda_tests
# The kernels' timings before the end-to-end run, whose serving is bound by the host's kernel
# launches (see docs/gpu.md) and takes longer.
phase quantized_kernel_bench quantized_kernel_bench
phase end_to_end end_to_end
phase cpu_tests cpu_tests
phase cpu_kernel_tests cpu_kernel_tests

echo "=== summary (total ${SECONDS}s)"
failed=0
for name in "${PHASES[@]}"; do
    echo "$name: $([ "${STATUS[$name]}" -eq 0 ] && echo pass || echo "FAIL (exit ${STATUS[$name]})")"
    [ "${STATUS[$name]}" -eq 0 ] || failed=1
done
exit $failed
