# The cloud daemon (`sft-cloud serve`) on a CUDA GPU host.
# Base: PyTorch's official CUDA runtime image, pinned by tag (torch, CUDA 12.4, cuDNN 9, Python 3.11).
# Build from the repository root:  docker build -f deploy/cloud.Dockerfile -t sft-cloud:0.1.0 .
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
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
COPY deploy/constraints/cloud.txt ./constraints.txt
# Keep the base image's CUDA torch: pin it to what is installed, everything else to constraints.txt.
RUN python -c "import torch; print('torch==' + torch.__version__)" >> constraints.txt \
    && pip install -c constraints.txt . \
    && python -c "import sft_cloud.daemon.server, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Non-root. Group 0 owns the writable paths, so `user: "<uid>:0"` (e.g. the host user that owns
# the mounted private keys) works as well as the default uid.
RUN useradd --uid 10001 --gid 0 --no-create-home --shell /usr/sbin/nologin sft \
    && mkdir -p /var/lib/sft/checkpoints /run/sft/certs \
    && chgrp -R 0 /var/lib/sft && chmod -R g=u /var/lib/sft
USER 10001:0
ENV HF_HOME=/var/lib/sft/hf-cache

VOLUME ["/var/lib/sft/checkpoints"]
EXPOSE 50051 9100

# The gRPC health service, asked by the daemon's own probe. Set SFT_HEALTH_TLS_CA (and
# SFT_HEALTH_SERVER_NAME, SFT_HEALTH_TLS_CERT/KEY for mutual TLS) or SFT_HEALTH_INSECURE=1.
ENV SFT_HEALTH_ADDRESS=localhost:50051
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-m", "sft_cloud.healthcheck"]

ENTRYPOINT ["sft-cloud"]
CMD ["serve", "--port", "50051", "--tls-cert", "/run/sft/certs/server.pem", "--tls-key", "/run/sft/certs/server.key", \
     "--checkpoint-dir", "/var/lib/sft/checkpoints", "--metrics-port", "9100", "--log-format", "json"]
