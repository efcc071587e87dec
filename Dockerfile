# One image for every Climber service: Faust workers, the topic job, the ranking service,
# the sandbox. Build arguments:
#   BASE_IMAGE       a Debian-based image with python3.11 (python3 -m venv must work)
#   TORCH_SPEC       the torch requirement; 2.13.x is what pyproject.toml accepts
#   TORCH_INDEX_URL  where torch comes from: the CPU build by default; for CUDA e.g.
#                    https://download.pytorch.org/whl/cu128 (see README "GPU")
# Wheels put in docker/wheels/ are preferred to any index (machines without the torch
# index: the compose test drops the local CPU wheel there).
# Digest as recorded in public Dockerfiles (not pulled here: no registry is reachable from
# the machines this was built on); bump it with `docker buildx imagetools inspect`.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91
FROM ${BASE_IMAGE}
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /app

# Layers from least to most often changed: torch, then the dependencies named in
# pyproject.toml (read with tomllib, so a source edit does not reinstall them), then the code.
COPY docker/wheels/ /tmp/wheels/
RUN pip install --find-links /tmp/wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" \
 && rm -rf /tmp/wheels
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

COPY README.md Makefile ./
COPY simulator simulator
COPY streaming streaming
COPY features features
COPY ranker ranker
COPY studies studies
COPY experiments experiments
COPY sandbox sandbox
COPY bench bench
COPY configs configs
RUN pip install --no-deps --no-build-isolation -e . && mkdir -p /app/runs /app/models
ENTRYPOINT ["climber"]
CMD ["--help"]
