#!/usr/bin/env python
"""Reference log-probs for every sequence of a preprocessed dataset, through training's own code path.

    torchrun --nproc-per-node 8 tools/precompute_reference_logps.py --load ckpt/mistral7b \\
        --data-prefix out/hh_train --tensor-model-parallel-size 2 --micro-batch-size 8
    torchrun --nproc-per-node 8 tools/precompute_reference_logps.py --load ckpt/qwen3_30b_a3b \\
        --data-prefix out/hh_train --expert-model-parallel-size 8

Writes PREFIX.ref.{npy,manifest.json}; training with loss.reference=precomputed reads them and
never builds the reference model. Runs on CPU (gloo) too.
"""

import argparse
import dataclasses
import sys

from megatron_rpo import parallel
from megatron_rpo.config import Config, DataConfig, ParallelConfig
from megatron_rpo.data.files import read_manifest
from megatron_rpo.data.preprocess import MANIFEST_KIND
from megatron_rpo.data.tokenizer import check_tokenized_for
from megatron_rpo.errors import InputError, report
from megatron_rpo.models import model_provider
from megatron_rpo.training.checkpointing import checkpoint_model_config, load_weights
from megatron_rpo.training.reference import compute_reference_logps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="the reference model's checkpoint (usually the converted one)")
    p.add_argument("--data-prefix", required=True)
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass per rank")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="mixture-of-experts models: experts split over this many ranks (out of the data-parallel ones)")
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="tensor parallelism inside each expert (default: --tensor-model-parallel-size)")
    p.add_argument("--no-packing", action="store_true",
                   help="pad every sequence to the dataset's max_length instead of packing each microbatch "
                        "into one row (the values are the same; packing skips the padding)")
    p.add_argument("--context-parallel-size", type=int, default=1,
                   help="cut every sequence over this many ranks (packed rows only; the values are the same)")
    p.add_argument("--logprob-chunk-tokens", type=int, default=None, metavar="N",
                   help="the output layer and log-softmax over N tokens at a time (model.logprob_chunk_tokens): "
                        "the whole [tokens, vocab / TP] logits never exist; the values are the same")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        dataset = read_manifest(a.data_prefix, MANIFEST_KIND)
        check_tokenized_for(a.data_prefix, dataset, a.load)  # before any GPU-hour is spent on it
        model_config = dataclasses.replace(checkpoint_model_config(a.load), logprob_chunk_tokens=a.logprob_chunk_tokens)
        model_config.validate()
        config = Config(
            model=model_config,
            parallel=ParallelConfig(tensor_model_parallel_size=a.tensor_model_parallel_size,
                                    pipeline_model_parallel_size=a.pipeline_model_parallel_size,
                                    context_parallel_size=a.context_parallel_size,
                                    expert_model_parallel_size=a.expert_model_parallel_size,
                                    expert_tensor_parallel_size=a.expert_tensor_parallel_size,
                                    # megatron's rule for experts under TP; the values are the same
                                    sequence_parallel=(a.tensor_model_parallel_size > 1
                                                       and model_config.num_moe_experts is not None)),
            data=DataConfig(max_prompt_length=dataset["max_prompt_length"], max_length=dataset["max_length"]),
        )
        config.check_lengths()
        if a.context_parallel_size > 1 and a.no_packing:
            raise ValueError("--context-parallel-size cuts packed rows only: leave out --no-packing")
        parallel.initialize(config.parallel)
        model = model_provider(config)
        load_weights(model, a.load)
        logps = compute_reference_logps(model, a.data_prefix,
                                        micro_batch_size=a.micro_batch_size, checkpoint=a.load,
                                        progress=not a.no_progress, packing=not a.no_packing,
                                        sequence_multiple=config.parallel.sequence_multiple)
    except InputError as e:
        report(e)
        return 1
    finally:
        parallel.destroy()
    if logps is not None:
        print(f"{len(logps)} reference log-probs (mean {logps.mean():.2f}) -> {a.data_prefix}.ref.{{npy,manifest.json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
