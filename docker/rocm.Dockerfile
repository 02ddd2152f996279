# slime for AMD GPUs: on the official SGLang ROCm image (ROCm 7.2, MI300-series), adding megatron-core and slime.
# The image carries the same SGLang release as the CUDA image (requirements/constraints-rocm.txt).
#   docker build -f docker/rocm.Dockerfile --build-arg SLIME_WHEEL=slime_rl-0.1.0-py3-none-any.whl -t slime:rocm .
ARG SGLANG_IMAGE_TAG=v0.5.10.post1-rocm720-mi30x
FROM lmsysorg/sglang:${SGLANG_IMAGE_TAG}

ARG SLIME_WHEEL
ARG MEGATRON_CORE_VERSION=0.16.1
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

COPY dist/${SLIME_WHEEL} /tmp/wheels/
# torch, triton and sglang for ROCm come from the base image and are not on PyPI. The wheel goes in with
# --no-deps so pip cannot swap in the PyPI (CUDA) triton; the rest of the [rocm] extra is listed here, pinned.
RUN pip install --no-cache-dir "megatron-core==${MEGATRON_CORE_VERSION}" "einops==0.8.1" "pyarrow==21.0.0" \
        "tensorboard==2.20.0" "matplotlib==3.10.7" "ray[default]==2.49.2" \
    && pip install --no-cache-dir --no-deps "/tmp/wheels/${SLIME_WHEEL}" \
    && rm -rf /tmp/wheels

WORKDIR /workspace
# The image's smoke test (release/images.py: smoke_command): slime env --json --hardware rocm
CMD ["slime", "env", "--hardware", "rocm"]
