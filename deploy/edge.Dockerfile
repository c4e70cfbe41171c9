# The edge trainer (`sft-edge train`) on any x86-64 host: CPU by default, or CUDA.
# Build from the repository root:
#   CPU:  docker build -f deploy/edge.Dockerfile -t sft-edge:0.1.0 .
#   CUDA: docker build -f deploy/edge.Dockerfile -t sft-edge:0.1.0-cuda \
#           --build-arg BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime --build-arg TORCH= .
ARG BASE_IMAGE=python:3.11.7-slim-bookworm
FROM ${BASE_IMAGE}
# The CPU wheel of torch, from PyTorch's CPU index (no CUDA libraries); empty: keep the base's torch.
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/sft
COPY pyproject.toml README.md ./
COPY sft_common ./sft_common
COPY sft_edge ./sft_edge
COPY sft_cloud ./sft_cloud
COPY deploy/constraints/cloud.txt ./constraints.txt
RUN if [ -n "$TORCH" ]; then pip install --index-url "$TORCH_INDEX" "$TORCH"; fi \
    && python -c "import torch; print('torch==' + torch.__version__)" >> constraints.txt \
    && pip install -c constraints.txt . \
    && python -c "import sft_edge.runs.trainer, torch; print('torch', torch.__version__)"

RUN useradd --uid 10001 --gid 0 --no-create-home --shell /usr/sbin/nologin sft \
    && mkdir -p /var/lib/sft/runs /run/sft/certs \
    && chgrp -R 0 /var/lib/sft && chmod -R g=u /var/lib/sft
USER 10001:0
ENV HF_HOME=/var/lib/sft/hf-cache

# No HEALTHCHECK: the edge is a batch job and serves nothing; its exit status is its health.
ENTRYPOINT ["sft-edge"]
CMD ["--help"]
