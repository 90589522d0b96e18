# syntax=docker/dockerfile:1
# megatron_rpo on NVIDIA's PyTorch container, which ships torch, transformer-engine and apex.
#   docker build -t megatron-rpo .
#   docker run --gpus all --ipc=host --rm -v "$PWD/runs:/workspace/megatron_rpo/runs" \
#     -v "$PWD/checkpoints:/workspace/megatron_rpo/checkpoints" -v "$PWD/data/hh_mistral:/workspace/megatron_rpo/data/hh_mistral" \
#     megatron-rpo torchrun --standalone --nproc-per-node=8 -m megatron_rpo.train --config configs/mistral7b_hh_rpo_paired.yaml
#
# Why this base: megatron-core 0.16.1 is developed against transformer-engine >= 2.9, < 2.12 (its
# `dev` extra, built for CUDA 13). NGC PyTorch 25.01, the previous base, ships transformer-engine 1.14,
# outside that range. 25.12 (CUDA 13.1, PyTorch 2.10, Python 3.12) ships a transformer-engine inside it;
# the build below refuses any base whose transformer-engine is not, so BASE can be moved safely.
ARG BASE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE}

WORKDIR /workspace/megatron_rpo
COPY setup.py pyproject.toml README.md ./
COPY megatron_rpo ./megatron_rpo
COPY tools ./tools
COPY configs ./configs
COPY examples ./examples
COPY scripts ./scripts
COPY bench ./bench
COPY tests ./tests
COPY data ./data
# torch, transformer-engine and apex come from the base image; the constraints file pins them
# so that no dependency can make pip replace them.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pip freeze | grep -iE "^(torch|transformer[-_]engine|apex)[=@ ]" > /tmp/base-constraints.txt \
    && pip install --no-cache-dir -c /tmp/base-constraints.txt -e ".[test]" \
    && python -c "import megatron_rpo, megatron.core, transformer_engine"
# The transformer-engine range megatron-core 0.16.1 is developed against, and its TE layer spec built
# from it (the GPU tier, scripts/gpu_check.sh, then runs it on a GPU).
RUN python - <<'EOF'
from importlib.metadata import version

from packaging.version import Version

te = Version(version("transformer_engine"))
assert Version("2.9.0a0") <= te < Version("2.12.0"), f"transformer-engine {te} is outside >=2.9,<2.12"
from megatron.core.extensions.transformer_engine import TEDotProductAttention, TELayerNormColumnParallelLinear
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

spec = get_gpt_layer_with_transformer_engine_spec()
attention = spec.submodules.self_attention.submodules
assert attention.core_attention is TEDotProductAttention, attention.core_attention
assert attention.linear_qkv is TELayerNormColumnParallelLinear, attention.linear_qkv
print(f"transformer-engine {te}: the TE layer spec builds")
EOF

ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
CMD ["bash"]
