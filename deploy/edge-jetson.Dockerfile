# The edge trainer (`sft-edge train`) on a Jetson Xavier NX: JetPack 5 (L4T r35), Python 3.8,
# NVIDIA's CUDA build of torch 2.0 for aarch64, pinned by tag. Build on the Jetson (or with
# `docker buildx --platform linux/arm64`) from the repository root:
#   docker build -f deploy/edge-jetson.Dockerfile -t sft-edge:0.1.0-l4t-r35.2.1 .
# Run with the NVIDIA runtime:  docker run --runtime nvidia ... sft-edge:0.1.0-l4t-r35.2.1 train ...
ARG BASE_IMAGE=nvcr.io/nvidia/l4t-pytorch:r35.2.1-pth2.0-py3
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/sft
COPY pyproject.toml README.md ./
COPY sft_common ./sft_common
COPY sft_edge ./sft_edge
COPY sft_cloud ./sft_cloud
COPY deploy/constraints/edge-py38.txt ./constraints.txt
# NVIDIA's torch stays (pinned to the installed build); the rest are the last releases for
# Python 3.8 that have aarch64 wheels (grpcio 1.70, protobuf 5.29: what the generated code needs).
RUN python3 -c "import torch; print('torch==' + torch.__version__)" >> constraints.txt \
    && python3 -m pip install --upgrade pip \
    && python3 -m pip install -c constraints.txt . \
    && python3 -c "import sft_edge.runs.trainer, torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

RUN useradd --uid 10001 --gid 0 --no-create-home --shell /usr/sbin/nologin sft \
    && mkdir -p /var/lib/sft/runs /run/sft/certs \
    && chgrp -R 0 /var/lib/sft && chmod -R g=u /var/lib/sft
USER 10001:0
ENV HF_HOME=/var/lib/sft/hf-cache

# No HEALTHCHECK: the edge is a batch job and serves nothing; its exit status is its health.
ENTRYPOINT ["sft-edge"]
CMD ["--help"]
