# Generation (`aligner serve generation`): Triton through PyTriton around the sampling engine,
# plus aligner.v1.Generation (weight pushes) in the same process.
# Built on an NVIDIA Triton + TensorRT-LLM image (CUDA torch, and tensorrt_llm for the
# `tensorrt_llm` engine), given as a build argument. From the repository root:
#   docker build -f docker/generation.Dockerfile \
#     --build-arg BASE_IMAGE=nvcr.io/nvidia/tritonserver:25.01-trtllm-python-py3 -t aligner-generation:0.1.0 .
ARG BASE_IMAGE=nvcr.io/nvidia/tritonserver:25.01-trtllm-python-py3
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/aligner \
    PATH=/opt/aligner/bin:$PATH

# Dependencies first (a layer that changes only with the pins). The venv sees the base image's
# packages (CUDA torch, TensorRT-LLM, and pip: no ensurepip needed); image_requirements.py drops torch from
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

# aligner.v1.Generation 5558; Triton HTTP 8000, gRPC 8001, metrics 8002; Prometheus /metrics 9400.
EXPOSE 5558 8000 8001 8002 9400
# The aligner.v1.Generation port the health check asks.
ENV ALIGNER_HEALTH_PORT=5558
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 CMD ["aligner-healthcheck"]
ENTRYPOINT ["aligner"]
CMD ["serve", "generation", "--help"]
