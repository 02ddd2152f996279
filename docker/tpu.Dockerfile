# slime for TPU: a Python 3.12 image with the TPU stack of requirements/constraints-tpu.txt, then slime.
#   docker build -f docker/tpu.Dockerfile --build-arg SLIME_WHEEL=slime_rl-0.1.0-py3-none-any.whl -t slime:tpu .
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim

ARG SLIME_WHEEL
# sglang-jax 0.0.2 requires jax[tpu]~=0.8.0 and flax~=0.12.0; these are the versions pinned inside that range.
ARG JAX_VERSION=0.8.3
ARG FLAX_VERSION=0.12.6
ARG SGLANG_JAX_VERSION=0.0.2
# The CPU build of torch (data plumbing, HF checkpoints) comes from the PyTorch CPU index, not PyPI's CUDA build.
ARG TORCH_VERSION=2.9.1
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

COPY dist/${SLIME_WHEEL} /tmp/wheels/
# sglang-jax pulls msgpack-python 0.5.6, which ships only an sdist: it builds here (pure-Python fallback).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir "jax[tpu]==${JAX_VERSION}" "flax==${FLAX_VERSION}" \
        "sglang-jax==${SGLANG_JAX_VERSION}" \
    && pip install --no-cache-dir "/tmp/wheels/${SLIME_WHEEL}[tpu]" \
    && rm -rf /tmp/wheels \
    && useradd --create-home --uid 1000 slime

USER 1000
WORKDIR /home/slime
# The image's smoke test (release/images.py: smoke_command): slime env --json --hardware tpu
CMD ["slime", "env", "--hardware", "tpu"]
