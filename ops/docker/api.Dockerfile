# The API image: FastAPI producer, webhook delivery worker and Flower. No torch, no model.
# Build from the repository root: docker build -f ops/docker/api.Dockerfile .
# (No "# syntax=" line on purpose: it would make BuildKit pull a frontend image, and hosts without
# registry access must still build. The built-in frontend supports the secret mount used below.)
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS runtime
# One layer for the OS part: Python from Debian, the unprivileged user, no apt lists left behind.
# Kept identical to the worker image's first stage (cache directory included) so they share it.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/* \
 && useradd --system --uid 10001 --user-group --home-dir /app --no-create-home guardfleet \
 && mkdir -p /cache/huggingface && chown guardfleet:guardfleet /cache/huggingface

FROM runtime AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
 && python3 -m venv /opt/venv
# Dependencies only (read from pyproject.toml), so editing the code never reinstalls them. The host
# CA bundle arrives as a build secret: behind a TLS-intercepting proxy pip needs it, and a secret
# never lands in a layer.
RUN --mount=type=secret,id=pip_ca,required=false \
    --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    --mount=type=bind,source=ops/docker/requirements.py,target=/tmp/requirements.py \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    /opt/venv/bin/python /tmp/requirements.py /tmp/pyproject.toml ops "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt

# The code in a stage of its own, so the final image gets it as one layer: with some storage
# drivers (vfs) every layer is a full copy of the filesystem below it.
FROM scratch AS code
COPY guardfleet /app/guardfleet
COPY api /app/api
COPY worker /app/worker

FROM runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=code /app /app
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
USER guardfleet
EXPOSE 8000 5555
CMD ["python", "-m", "api", "--host", "0.0.0.0", "--port", "8000"]
