# megatron_rpo on NVIDIA's PyTorch container, which ships torch, transformer-engine and apex.
#   docker build -t megatron-rpo .
#   docker run --gpus all --ipc=host --rm -v "$PWD/runs:/workspace/megatron_rpo/runs" megatron-rpo \
#     torchrun --standalone --nproc-per-node=8 -m megatron_rpo.train --config configs/mistral7b_hh_rpo_paired.yaml
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /workspace/megatron_rpo
COPY setup.py pyproject.toml README.md ./
COPY megatron_rpo ./megatron_rpo
COPY tools ./tools
COPY configs ./configs
COPY examples ./examples
COPY data ./data
# torch, transformer-engine and apex come from the base image; the constraints file pins them
# so that no dependency can make pip replace them.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN pip freeze | grep -iE "^(torch|transformer[-_]engine|apex)[=@ ]" > /tmp/base-constraints.txt \
    && pip install --no-cache-dir -c /tmp/base-constraints.txt -e . \
    && python -c "import megatron_rpo, megatron.core, transformer_engine"

ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
CMD ["bash"]
