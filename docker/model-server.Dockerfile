# Model servers: reward, critic, reward-critic and reference (`aligner serve <role>`).
# Built on an NVIDIA PyTorch image (CUDA torch, NCCL), given as a build argument. From the
# repository root:
#   docker build -f docker/model-server.Dockerfile \
#     --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3 -t aligner-model-server:0.1.0 .
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/aligner \
    PATH=/opt/aligner/bin:$PATH

# Dependencies first (a layer that changes only with the pins). The venv sees the base image's
# packages (its CUDA torch, and pip: no ensurepip needed); image_requirements.py drops torch from
# our pins.
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY docker/image_requirements.py docker/
RUN python3 -m venv --system-site-packages --without-pip /opt/aligner \
 && python docker/image_requirements.py pyproject.toml constraints.txt /tmp/requirements.txt /tmp/constraints.txt \
 && python -m pip install -c /tmp/constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt /tmp/constraints.txt

COPY proto proto
COPY common common
COPY trainer trainer
COPY services services
RUN python -m pip install --no-deps . \
 && rm -rf /src
COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/aligner-healthcheck

# Never root at run time; a fixed numeric id so Kubernetes' runAsNonRoot can verify it.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin aligner
USER 10001:10001
WORKDIR /home/aligner

# gRPC: reward / reward-critic 5555, critic 5556, reference 5557; Prometheus /metrics 9400.
EXPOSE 5555 5556 5557 9400
# The gRPC port the health check asks; set it per role (critic 5556, reference 5557).
ENV ALIGNER_HEALTH_PORT=5555
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 CMD ["aligner-healthcheck"]
ENTRYPOINT ["aligner"]
CMD ["serve", "--help"]
