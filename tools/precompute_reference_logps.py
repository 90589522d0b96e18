#!/usr/bin/env python
"""Reference log-probs for every sequence of a preprocessed dataset, through training's own code path.

    torchrun --nproc-per-node 8 tools/precompute_reference_logps.py --config configs/qwen3_30b_a3b_rpo.yaml \\
        --data-prefix data/hh_qwen3/train
    torchrun --nproc-per-node 8 tools/precompute_reference_logps.py --load ckpt/mistral7b \\
        --data-prefix out/hh_train --tensor-model-parallel-size 2 --micro-batch-size 8

With ``--config RECIPE [section.key=value ...]`` the run's own settings are used: its parallel
layout (forward only, so without interleaving), its chunked log-probs and its reference
checkpoint (``loss.reference_checkpoint``, else ``train.load``). The parallel and chunking flags
are shorthands for those settings (and override the recipe); without a recipe they default to 1
and none.

Writes PREFIX.ref.{npy,manifest.json}; training with loss.reference=precomputed reads them and
never builds the reference model. Runs on CPU (gloo) too.
"""

import argparse
import dataclasses
import sys

from megatron_rpo import parallel
from megatron_rpo.config import Config, DataConfig, load_config
from megatron_rpo.data.files import read_manifest
from megatron_rpo.data.preprocess import MANIFEST_KIND
from megatron_rpo.data.tokenizer import check_tokenized_for
from megatron_rpo.errors import INPUT_ERROR_EXIT_CODE, InputError, report
from megatron_rpo.models import model_provider
from megatron_rpo.training.checkpointing import checkpoint_model_config, load_weights
from megatron_rpo.training.reference import compute_reference_logps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, metavar="RECIPE",
                   help="the training recipe: its parallel layout, chunking and reference checkpoint (see above)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the recipe, as for training")
    p.add_argument("--load", default=None,
                   help="the reference model's checkpoint (usually the converted one; default: the recipe's "
                        "loss.reference_checkpoint or train.load)")
    p.add_argument("--data-prefix", required=True)
    p.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward pass per rank")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None, help="parallel.tensor_model_parallel_size")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=None,
                   help="parallel.pipeline_model_parallel_size")
    p.add_argument("--expert-model-parallel-size", type=int, default=None,
                   help="parallel.expert_model_parallel_size: mixture-of-experts models, experts split over this "
                        "many ranks (out of the data-parallel ones)")
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="parallel.expert_tensor_parallel_size: tensor parallelism inside each expert (default: the "
                        "tensor-parallel size)")
    p.add_argument("--no-packing", action="store_true",
                   help="pad every sequence to the dataset's max_length instead of packing each microbatch "
                        "into one row (the values are the same; packing skips the padding)")
    p.add_argument("--context-parallel-size", type=int, default=None,
                   help="parallel.context_parallel_size: cut every sequence over this many ranks (packed rows only; "
                        "the values are the same)")
    p.add_argument("--logprob-chunk-tokens", type=int, default=None, metavar="N",
                   help="model.logprob_chunk_tokens: the output layer and log-softmax over N tokens at a time, so "
                        "the whole [tokens, vocab / TP] logits never exist; the values are the same")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        recipe = load_config(a.config, a.overrides) if a.config else Config()
        if a.overrides and not a.config:
            raise InputError(f"overrides {a.overrides} need --config RECIPE")
        load = a.load or recipe.loss.reference_checkpoint or recipe.train.load
        if not load:
            raise InputError("name the reference model: --load CHECKPOINT, or --config RECIPE whose train.load "
                             "(or loss.reference_checkpoint) names it")
        dataset = read_manifest(a.data_prefix, MANIFEST_KIND)
        check_tokenized_for(a.data_prefix, dataset, load)  # before any GPU-hour is spent on it
        chunk = a.logprob_chunk_tokens if a.logprob_chunk_tokens is not None else recipe.model.logprob_chunk_tokens
        model_config = dataclasses.replace(checkpoint_model_config(load), logprob_chunk_tokens=chunk)
        model_config.validate()
        flags = {"tensor_model_parallel_size": a.tensor_model_parallel_size,
                 "pipeline_model_parallel_size": a.pipeline_model_parallel_size,
                 "context_parallel_size": a.context_parallel_size,
                 "expert_model_parallel_size": a.expert_model_parallel_size,
                 "expert_tensor_parallel_size": a.expert_tensor_parallel_size}
        layout = dataclasses.replace(recipe.parallel, **{k: v for k, v in flags.items() if v is not None})
        tp = layout.tensor_model_parallel_size
        config = Config(
            model=model_config,
            # forward only: no interleaving; sequence parallelism as the recipe has it, and always for
            # experts under TP (megatron's rule); the values are the same either way
            parallel=dataclasses.replace(layout, virtual_pipeline_model_parallel_size=None,
                                         sequence_parallel=tp > 1 and (layout.sequence_parallel
                                                                       or model_config.num_moe_experts is not None)),
            data=DataConfig(max_prompt_length=dataset["max_prompt_length"], max_length=dataset["max_length"]),
        )
        config.check_lengths()
        if config.parallel.context_parallel_size > 1 and a.no_packing:
            raise InputError("context parallelism cuts packed rows only: leave out --no-packing")
        parallel.initialize(config.parallel)
        model = model_provider(config)
        load_weights(model, load)
        logps = compute_reference_logps(model, a.data_prefix,
                                        micro_batch_size=a.micro_batch_size, checkpoint=load,
                                        progress=not a.no_progress, packing=not a.no_packing,
                                        sequence_multiple=config.parallel.sequence_multiple)
    except InputError as e:
        report(e)
        return INPUT_ERROR_EXIT_CODE
    finally:
        parallel.destroy()
    if logps is not None:
        print(f"{len(logps)} reference log-probs (mean {logps.mean():.2f}) -> "
              f"{a.data_prefix}.ref.{{npy,manifest.json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
