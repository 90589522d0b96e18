"""Context parallelism on CPU: tokens/s and each rank's peak memory at CP 1 against CP C.

The tiny model (``bench/throughput.py``'s) on one packed microbatch of long synthetic sequences
(``--length``, 2048 tokens), RPO with a precomputed reference: CP 1 (one process) and CP C (C
gloo processes sharing the cores). Reported: the median step time, tokens/s and each rank's peak
RSS growth over a step (after the first), and the ratios; the memory ratio is the point (about
1/C expected), the time is the cores' to share.

    python bench/context_parallel.py              # CP 1 against CP 2, about 2 minutes on 2 cores
    python bench/context_parallel.py --cp 4 --length 4096
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings

from throughput import TINY, peak_rss, rss


def _context_parallel_rank(rank, world, store, length, pairs, steps, out):
    """One process of a CP = ``world`` run (gloo, the CPU's cores shared): the median step time
    and this rank's peak RSS growth over a step, on ``pairs`` synthetic pairs of ``length`` tokens."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_rpo import parallel
    from megatron_rpo.config import config_from_dict
    from megatron_rpo.data.packing import packed_length, token_fields
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.optimizer import build_optimizer
    from megatron_rpo.training.step import train_step

    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    parallel.connect(init_method=f"file://{store}", rank=rank, world_size=world)
    config = config_from_dict({
        "model": dict(TINY, max_position_embeddings=length),
        "parallel": {"context_parallel_size": world},
        "data": {"max_prompt_length": 256, "max_length": length},
        "loss": {"reference": "precomputed"},
        "train": {"micro_batch_size": pairs, "global_batch_size": pairs}})
    parallel.initialize(config.parallel)
    module = model_provider(config)
    model = DistributedDataParallel(module.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)
    optimizer = build_optimizer(config.optimizer, [model], bf16=False)
    g = torch.Generator().manual_seed(0)  # every rank draws the same microbatch
    prompts = [torch.randint(1, TINY["vocab_size"], (256,), generator=g) for _ in range(pairs)]
    sequences = [torch.cat([p, torch.randint(1, TINY["vocab_size"], (length - 256,), generator=g)])
                 for p in prompts + prompts]
    multiple = config.parallel.sequence_multiple
    batch = token_fields(sequences, [256] * len(sequences), packed=True, sequence_multiple=multiple,
                         length=packed_length([length] * len(sequences), 64, multiple))
    batch.update(is_chosen=torch.arange(2 * pairs) < pairs, pair_id=torch.arange(2 * pairs) % pairs,
                 ref_logps=-torch.rand(2 * pairs, generator=g) * 100,
                 prompt_embedding=torch.nn.functional.normalize(torch.randn(pairs, 8, generator=g), dim=1).repeat(2, 1))
    times, before = [], None
    for step in range(1 + steps):
        if step == 1:
            before = rss()  # after the first step: optimizer state and caches exist
        start = time.perf_counter()
        train_step([model], optimizer, [batch], config.loss)
        if step:
            times.append(time.perf_counter() - start)
    out.put((rank, statistics.median(times), max(0, peak_rss() - before)))
    parallel.destroy()


def context_parallel(cp: int, length: int, pairs: int, steps: int) -> None:
    """``--context-parallel C``: tokens/s and peak memory per rank at CP 1 and CP C (fresh processes)."""
    ctx = multiprocessing.get_context("spawn")
    tokens = 2 * pairs * length
    print(f"CPU, {TINY['num_layers']} layers, hidden {TINY['hidden_size']}, vocab {TINY['vocab_size']}, fp32; RPO "
          f"(precomputed reference) on one packed microbatch of {2 * pairs} sequences x {length} tokens; median of "
          f"{steps} steps; peak RSS growth per rank over a step")
    print(f"{'CP':>4}{'ms/step':>10}{'tokens/s':>10}{'peak MiB/rank':>15}")
    base = None
    for world in (1, cp):
        out = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            procs = [ctx.Process(target=_context_parallel_rank,
                                 args=(r, world, os.path.join(tmp, "store"), length, pairs, steps, out))
                     for r in range(world)]
            for proc in procs:
                proc.start()
            results = [out.get(timeout=3600) for _ in procs]
            for proc in procs:
                proc.join(timeout=60)
        step = max(r[1] for r in results)
        peak = max(r[2] for r in results)
        base = base or (step, peak)
        print(f"{world:>4}{step * 1000:>10.0f}{tokens / step:>10.0f}{peak / 2**20:>15.0f}")
    print(f"CP {cp} / CP 1: peak memory per rank {peak / base[1]:.2f} (about 1/{cp} expected), "
          f"tokens/s {base[0] / step:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, default=2, help="the context-parallel size to compare with CP 1 (default 2)")
    p.add_argument("--length", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--pairs", type=int, default=1, help="pairs in the microbatch (default 1)")
    p.add_argument("--steps", type=int, default=3, help="measured steps (default 3)")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    context_parallel(args.cp, args.length, args.pairs, args.steps)


if __name__ == "__main__":
    main()
