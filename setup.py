"""Install duo_fast.

* The repository's ``kernels/`` folder is installed as ``duo_fast.kernels``.
* The C++ extension ``duo_fast._C`` (``csrc/``: the T-table lookup op) is prebuilt when torch is
  importable at build time (``pip install --no-build-isolation``): a CPU extension, plus the
  CUDA kernel when torch has CUDA and nvcc is found. Otherwise (``pip install .``, whose isolated
  build cannot see torch) the sources are installed as ``duo_fast.csrc`` and compiled on first
  use (``duo_fast/ops/extension.py``). ``DUO_FAST_SKIP_EXT=1`` skips the prebuild; ``DUO_FAST_SKIP_CUDA=1``
  builds CPU only.
"""

import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("DUO_FAST_SKIP_EXT", "0") != "1":
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("duo_fast: torch is not importable at build time; the C++ op will be compiled on first use "
              "(or prebuilt with pip install --no-build-isolation)", file=sys.stderr)
    else:
        sources = ["csrc/ttable_lookup_cpu.cpp", "csrc/rb_loss_cpu.cpp"]
        cxx = ["-O3", "-std=c++17", "-fopenmp"]       # -fopenmp: at::parallel_for runs on all threads
        if torch.version.cuda and CUDA_HOME and os.environ.get("DUO_FAST_SKIP_CUDA", "0") != "1":
            ext = CUDAExtension("duo_fast._C", sources + ["csrc/ttable_lookup_cuda.cpp", "csrc/ttable_lookup_kernel.cu"],
                                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
                                extra_link_args=["-fopenmp"])
        else:
            ext = CppExtension("duo_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        ext_modules = [ext]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    name="duo_fast",
    version="0.1.0",
    description="Fast training, distillation and sampling of Duo discrete diffusion language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["duo_fast", "duo_fast.core", "duo_fast.ops", "duo_fast.model", "duo_fast.data", "duo_fast.io",
              "duo_fast.sampling", "duo_fast.eval", "duo_fast.training", "duo_fast.tools", "duo_fast.bench",
              "duo_fast.kernels", "duo_fast.csrc"],
    package_dir={"duo_fast": "duo_fast", "duo_fast.kernels": "kernels", "duo_fast.csrc": "csrc"},
    # the C++ sources ship too: an install that cannot prebuild the op compiles them on first use
    package_data={"duo_fast.data": ["jargon.txt.gz"], "duo_fast.training": ["configs/*.json"],
                  "duo_fast.csrc": ["*.cpp", "*.h", "*.cu"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        # Triton 3.3.1, 3.4.0, 3.6.0 and 3.9.0 are checked by `make compat` / `make test` (every kernel
        # configuration compiled for sm_90a as the JIT builds it, and the interpreter kernel tests; before
        # 3.9 the interpreter needs numpy < 2.4). Triton 3.2 and older fail. torch 2.7 is the first
        # release whose CUDA build pins a Triton >= 3.3; CI runs torch 2.13.0.
        "torch>=2.7",
        "triton>=3.3.1",
        "numpy",
        "scipy",
        "safetensors",
        "tokenizers",
        "transformers",
        "datasets",
        "huggingface_hub",
        "tqdm",
        "pyyaml",
        "deepspeed",             # ZeRO 1-3 training; pure Python install (DS_BUILD_OPS=0)
        "ninja",                 # builds the C++ op on first use when the install could not prebuild it
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "omegaconf", "ruff"],   # omegaconf: tests write public-style .ckpt files
        "flash": ["flash-attn"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["duo-fast=duo_fast.cli:main"]},
)
