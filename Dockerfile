# megafim on CUDA: a PyTorch devel image (nvcc for flash-attn), the package with its GPU extras, and the
# C++ extensions built at image-build time (nothing compiles at run time).
#
#   docker build -t megafim .
#   docker run --gpus all --ipc=host --rm -it -v $PWD/runs:/workspace/megafim/runs megafim \
#       torchrun --standalone --nproc_per_node=8 -m megafim.train --config examples/configs/1.3B.yaml
#
# The base image's torch is kept: setup.py asks only for torch>=2.3, which it satisfies.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MAX_JOBS=8
RUN apt-get update && apt-get install -y --no-install-recommends git build-essential ninja-build \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/megafim
# Dependencies first, so that a code change does not reinstall them.
COPY setup.py pyproject.toml README.md ./
COPY csrc ./csrc
COPY megafim ./megafim
# flash-attn compiles against the image's torch, so it must see it: no build isolation for it.
RUN pip install packaging wheel pybind11 \
    && pip install --no-build-isolation "flash-attn>=2.5" \
    && pip install -e ".[hf]"

COPY . .
# Rebuild the extensions against the final tree and check that they import.
RUN python setup.py build_ext --inplace -q \
    && python -c "import megafim, pkgutil, megafim._native as n; print([m.name for m in pkgutil.iter_modules(n.__path__)])"

CMD ["bash"]
