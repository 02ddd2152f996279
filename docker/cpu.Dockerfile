# slime for CPU: the embedded rollout engine and Megatron-core on gloo, on a slim Python image.
# Built by the release and nightly workflows from a wheel in dist/:
#   docker build -f docker/cpu.Dockerfile --build-arg SLIME_WHEEL=slime_rl-0.1.0-py3-none-any.whl -t slime:cpu .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG SLIME_WHEEL
# The CPU build of torch comes from the PyTorch CPU index; from PyPI, Linux torch is the multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 OMP_NUM_THREADS=1

COPY dist/${SLIME_WHEEL} /tmp/wheels/
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir "/tmp/wheels/${SLIME_WHEEL}[cpu]" \
    && rm -rf /tmp/wheels \
    && useradd --create-home --uid 1000 slime

USER 1000
WORKDIR /home/slime
# The image's smoke test (release/images.py: smoke_command): slime env --json --hardware cpu
CMD ["slime", "env", "--hardware", "cpu"]
