#!/usr/bin/env python
"""Convert a Hugging Face checkpoint (Llama 2/3, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral) into a Megatron checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir Mistral-7B-v0.1 --output-dir ckpt/mistral7b \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1

The output holds whole tensors one file per layer (each expert whole), so training loads it at
any TP/PP/EP split; the split named here is checked against the model and recorded. Memory
stays at about one layer.
"""

import argparse
import sys

from megatron_rpo.convert import convert_hf_to_megatron
from megatron_rpo.errors import INPUT_ERROR_EXIT_CODE, InputError, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="config.json + model.safetensors (or sharded with an index)")
    p.add_argument("--output-dir", required=True, help="must not exist or be empty")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1, help="mixture-of-experts models")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        meta = convert_hf_to_megatron(a.hf_dir, a.output_dir, tensor_model_parallel_size=a.tensor_model_parallel_size,
                                      pipeline_model_parallel_size=a.pipeline_model_parallel_size,
                                      expert_model_parallel_size=a.expert_model_parallel_size,
                                      progress=not a.no_progress)
    except InputError as e:
        report(e)
        return INPUT_ERROR_EXIT_CODE
    m = meta["model"]
    experts = f", {m['num_moe_experts']} experts (top {m['moe_router_topk']})" if m.get("num_moe_experts") else ""
    print(f"{meta['architecture']}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
          f"vocab {m['vocab_size']}{experts}, "
          f"{meta['dtype']} -> {a.output_dir} (tokenizer files: {', '.join(meta['tokenizer_files']) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
