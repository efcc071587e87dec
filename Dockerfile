# One image for every Climber service (sandbox, Faust workers, ranking service).
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends make gcc && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md Makefile ./
COPY simulator simulator
COPY streaming streaming
COPY features features
COPY ranker ranker
COPY studies studies
COPY experiments experiments
COPY sandbox sandbox
COPY bench bench
COPY configs configs
# CPU torch first and pinned (an unpinned torch pulls multi-GB CUDA builds), then the project.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -e .
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["climber"]
