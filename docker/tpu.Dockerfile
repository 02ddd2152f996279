# slime for TPU: a Python 3.12 image with the TPU stack of requirements/constraints-tpu.txt, slime, then sglang-jax
# at its known-good commit.
#   docker build -f docker/tpu.Dockerfile --build-arg SLIME_WHEEL=slime_rl-0.1.0-py3-none-any.whl -t slime:tpu .
# Every package version comes from the constraints file (pip -c), the one the [tpu] extra follows: this file
# names no version itself (test/registered/release/test_install_agreement.py checks that). sglang-jax has no
# working release on the index; it is built from the commit slime/backends/tpu/__init__.py names (SGLANG_JAX),
# as a source archive, so the image needs no git; the same test checks the URL against that commit.
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim

ARG SLIME_WHEEL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements/constraints-tpu.txt /tmp/constraints-tpu.txt
COPY dist/${SLIME_WHEEL} /tmp/wheels/
# torch's CPU build (data plumbing, HF checkpoints) comes from the PyTorch CPU index, not PyPI's CUDA build.
# sglang-jax pulls msgpack-python 0.5.6, which ships only an sdist: it builds here (pure-Python fallback).
RUN pip install --no-cache-dir -c /tmp/constraints-tpu.txt --index-url https://download.pytorch.org/whl/cpu torch \
    && pip install --no-cache-dir -c /tmp/constraints-tpu.txt "jax[tpu]" flax \
    && pip install --no-cache-dir -c /tmp/constraints-tpu.txt "/tmp/wheels/${SLIME_WHEEL}[tpu]" \
    && pip install --no-cache-dir -c /tmp/constraints-tpu.txt \
       "sglang-jax @ https://github.com/sgl-project/sglang-jax/archive/cddbf6f1cc33cbdd453bd8f36ff7051cf46ca176.tar.gz#subdirectory=python" \
    && rm -rf /tmp/wheels /tmp/constraints-tpu.txt \
    && useradd --create-home --uid 1000 slime

USER 1000
WORKDIR /home/slime
# The image's smoke test (release/images.py: smoke_command): slime env --json --hardware tpu
CMD ["slime", "env", "--hardware", "tpu"]
