# The worker image: torch, transformers and the bundled demo model. Which torch is a build argument:
#   TORCH_VARIANT=cuda  torch from PyPI, the CUDA build (GPU hosts; several GB of NVIDIA wheels)
#   TORCH_VARIANT=cpu   the CPU build: a wheel the host left in ops/docker/wheels/ if there is one
#                       (nothing downloaded), else PyTorch's CPU index. Never the CUDA wheels.
# Build from the repository root: docker build -f ops/docker/worker.Dockerfile --build-arg TORCH_VARIANT=cpu .
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS runtime
# HF_HOME (below) is where compose mounts the model cache volume: the user must be able to write it.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/* \
 && useradd --system --uid 10001 --user-group --home-dir /app --no-create-home guardfleet \
 && mkdir -p /cache/huggingface && chown guardfleet:guardfleet /cache/huggingface

FROM runtime AS build
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
 && python3 -m venv /opt/venv
# torch first and alone, so its variant is decided here and nothing later replaces it; then the
# rest of the worker's dependencies. The wheels folder is bind-mounted, not copied: a 200 MB
# wheel in a layer would stay in the image even after it is installed.
RUN --mount=type=secret,id=pip_ca,required=false \
    --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    --mount=type=bind,source=ops/docker/requirements.py,target=/tmp/requirements.py \
    --mount=type=bind,source=ops/docker/wheels,target=/wheels \
    set -e; \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip="/opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check"; \
    case "$TORCH_VARIANT" in \
      cuda) $pip "torch==$TORCH_VERSION" ;; \
      cpu) wheel=$(ls /wheels/torch-"$TORCH_VERSION"*.whl 2>/dev/null | head -n 1 || true); \
           if [ -n "$wheel" ]; then echo "torch from the host's wheel $wheel"; $pip "$wheel"; \
           else $pip --index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple "torch==$TORCH_VERSION"; fi ;; \
      *) echo "TORCH_VARIANT must be cuda or cpu, not $TORCH_VARIANT" >&2; exit 2 ;; \
    esac; \
    /opt/venv/bin/python /tmp/requirements.py /tmp/pyproject.toml worker "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /tmp/requirements.txt; \
    $pip -r /tmp/requirements.txt; \
    /opt/venv/bin/python -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"

# The code in a stage of its own, so the final image gets it as one layer: with some storage
# drivers (vfs) every layer is a full copy of the filesystem below it.
FROM scratch AS code
COPY guardfleet /app/guardfleet
COPY worker /app/worker

FROM runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=code /app /app
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface OMP_WAIT_POLICY=PASSIVE
WORKDIR /app
USER guardfleet
CMD ["python", "-m", "worker"]
