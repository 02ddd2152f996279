# slime for NVIDIA GPUs: on the official SGLang CUDA image (Python 3.12, CUDA 12.9), adding megatron-core,
# DeepEP and slime. The image's SGLang is the one requirements/constraints-cuda.txt pins (sglang==X gives
# the tag vX), so installing the [cuda] extra finds torch, sglang and its kernels already there.
#   docker build -f docker/cuda.Dockerfile --build-arg SLIME_WHEEL=slime_rl-0.1.0-py3-none-any.whl -t slime:cuda .
ARG SGLANG_IMAGE_TAG=v0.5.10.post1
FROM lmsysorg/sglang:${SGLANG_IMAGE_TAG}

ARG SLIME_WHEEL
ARG MEGATRON_CORE_VERSION=0.16.1
# DeepEP is not on PyPI; it builds from a pinned ref against the NVSHMEM the SGLang image ships.
ARG DEEPEP_REF=v1.2.1
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

COPY dist/${SLIME_WHEEL} /tmp/wheels/
# torch, sglang and triton come from the base image; installing the extra must not replace them.
RUN pip install --no-cache-dir "megatron-core==${MEGATRON_CORE_VERSION}" \
    && (python -c "import deep_ep" 2>/dev/null \
        || pip install --no-cache-dir --no-build-isolation "deep_ep @ git+https://github.com/deepseek-ai/DeepEP.git@${DEEPEP_REF}") \
    && pip install --no-cache-dir "/tmp/wheels/${SLIME_WHEEL}[cuda]" \
    && rm -rf /tmp/wheels

WORKDIR /workspace
# The image's smoke test (release/images.py: smoke_command): slime env --json --hardware cuda
CMD ["slime", "env", "--hardware", "cuda"]
