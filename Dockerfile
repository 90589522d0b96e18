# syntax=docker/dockerfile:1
# megatron_rpo on NVIDIA's PyTorch container, which ships torch, transformer-engine and apex.
#   docker build -t megatron-rpo .
#   docker run --gpus all --ipc=host --rm -v "$PWD/runs:/workspace/megatron_rpo/runs" \
#     -v "$PWD/checkpoints:/workspace/megatron_rpo/checkpoints" -v "$PWD/data/hh_mistral:/workspace/megatron_rpo/data/hh_mistral" \
#     megatron-rpo torchrun --standalone --nproc-per-node=8 -m megatron_rpo.train --config configs/mistral7b_hh_rpo_paired.yaml
#
# Why this base: megatron-core 0.19 (the newest release within setup.py's range) is developed on NGC
# PyTorch 26.06 (Megatron-LM's CI image for core_v0.19.0, CUDA 13.3, Python 3.12), with
# transformer-engine 2.17-2.18 built on it. pip picks the newest megatron-core in the range there.
# An older base still works: --build-arg BASE=nvcr.io/nvidia/pytorch:25.12-py3 --build-arg
# MEGATRON_CORE=0.16.1 (0.16.1 declares transformer-engine >= 2.9, < 2.12, which 25.12 ships).
# The build refuses a base whose transformer-engine is outside the range of the megatron-core it
# installs (below), and checks that the TE layer spec builds.
ARG BASE=nvcr.io/nvidia/pytorch:26.06-py3
FROM ${BASE}
# A megatron-core release to install (e.g. 0.16.1 on a 25.x base); empty: the newest within range.
ARG MEGATRON_CORE=

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
RUN pip freeze | grep -iE "^(torch|transformer[-_]engine|apex|triton)[=@ ]" > /tmp/base-constraints.txt \
    && pip install --no-cache-dir -c /tmp/base-constraints.txt -e ".[test]" \
        ${MEGATRON_CORE:+"megatron-core==${MEGATRON_CORE}"} \
    && python -c "import megatron_rpo, megatron.core, transformer_engine"
# The transformer-engine range the installed megatron-core is developed against, and its TE layer spec
# built from it (the GPU tier, scripts/gpu_check.sh, then runs it on a GPU). 0.16 declares
# >= 2.9, < 2.12; 0.17 and later declare no range, and 0.19's CI builds 2.17-2.18: newer than
# 2.18 is refused until a release is developed against it.
RUN python - <<'EOF'
from importlib.metadata import version

from packaging.version import Version

from megatron_rpo.versions import release

core = version("megatron-core")
te = Version(version("transformer_engine"))
low, high = ("2.9.0a0", "2.12.0") if release(core) < (0, 17) else ("2.9.0a0", "2.19.0")
assert Version(low) <= te < Version(high), f"transformer-engine {te} is outside >={low},<{high} for megatron-core {core}"
from megatron.core.extensions.transformer_engine import TEDotProductAttention, TELayerNormColumnParallelLinear
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

spec = get_gpt_layer_with_transformer_engine_spec()
attention = spec.submodules.self_attention.submodules
assert attention.core_attention is TEDotProductAttention, attention.core_attention
assert attention.linear_qkv is TELayerNormColumnParallelLinear, attention.linear_qkv
print(f"megatron-core {core}, transformer-engine {te}: the TE layer spec builds")
EOF

ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
CMD ["bash"]
