# slime for TPU: a Python image with jax[tpu] and sglang-jax (both need Python >= 3.12), then slime.
#   docker build -f docker/tpu.Dockerfile --build-arg SLIME_WHEEL=slime-0.1.0-py3-none-any.whl -t slime:tpu .
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim

ARG SLIME_WHEEL
ARG JAX_VERSION=0.7.2
ARG SGLANG_JAX_VERSION=0.0.2
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

COPY dist/${SLIME_WHEEL} /tmp/wheels/
RUN pip install --no-cache-dir "jax[tpu]==${JAX_VERSION}" "sglang-jax==${SGLANG_JAX_VERSION}" \
    && pip install --no-cache-dir "/tmp/wheels/${SLIME_WHEEL}[tpu]" \
    && rm -rf /tmp/wheels \
    && useradd --create-home --uid 1000 slime

USER 1000
WORKDIR /home/slime
# The image's smoke test (release/images.py: smoke_command): slime env --json --hardware tpu
CMD ["slime", "env", "--hardware", "tpu"]
