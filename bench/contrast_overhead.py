"""Step time of the contrast scopes against DPO, measured in one run on a tiny CPU model.

Two data-parallel gloo ranks (on CUDA one rank per GPU, at most two) train the same model with megatron DDP; each
step is forward-backward over the step's microbatches plus DDP's gradient reduction. The
configurations run interleaved, step by step, so machine noise hits them alike; the report is
the median step time of each and the ratios:

* RPO with ``contrast_scope: data_parallel`` / DPO: the all-gather and the M x N matrix
  (target <= 1.03);
* RPO ``global_batch`` / RPO ``data_parallel``: gradient caching's extra forward pass
  (target <= 1.40; a forward is about a third of forward + backward).

    python bench/contrast_overhead.py [--steps 12] [--microbatches 4] [--pairs 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time

CONFIGS = {
    "dpo": dict(loss_type="dpo"),
    "rpo_data_parallel": dict(loss_type="rpo", contrast_scope="data_parallel"),
    "rpo_global_batch": dict(loss_type="rpo", contrast_scope="global_batch"),
}


def _batches(seed, microbatches, pairs, seq, vocab, emb_dim=384):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(microbatches):
        rows = 2 * pairs
        tokens = torch.randint(1, vocab, (rows, seq), generator=g)
        tokens[pairs:, : seq // 2] = tokens[:pairs, : seq // 2]  # shared prompts
        loss_mask = torch.zeros(rows, seq)
        loss_mask[:, seq // 2 - 1 : -1] = 1.0
        emb = torch.nn.functional.normalize(torch.randn(pairs, emb_dim, generator=g), dim=1)
        out.append({
            "tokens": tokens,
            "position_ids": torch.arange(seq).expand(rows, seq).clone(),
            "labels": torch.roll(tokens, -1, dims=1),
            "loss_mask": loss_mask,
            "is_chosen": torch.arange(rows) < pairs,
            "prompt_embedding": torch.cat([emb, emb]),
            "ref_logps": -torch.rand(rows, generator=g) * 100,
            "pair_id": torch.arange(rows) % pairs,
        })
    return out


def _rank(rank, store, args, out):
    import warnings

    import torch
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_rpo import parallel
    from megatron_rpo.config import config_from_dict
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.step import forward_backward

    warnings.simplefilter("ignore")  # megatron's notes about transformer-engine/apex fallbacks
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    os.environ["LOCAL_RANK"] = str(rank)  # this rank's GPU under CUDA
    parallel.connect(init_method=f"file://{store}", rank=rank, world_size=args.ranks)
    model_cfg = dict(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden,
                     num_attention_heads=8, vocab_size=args.vocab, max_position_embeddings=args.seq)
    configs = {name: config_from_dict({"model": model_cfg, "loss": loss,
                                       "data": dict(max_prompt_length=args.seq // 2, max_length=args.seq)})
               for name, loss in CONFIGS.items()}
    parallel.initialize(next(iter(configs.values())).parallel)
    module = model_provider(next(iter(configs.values())))
    model = DistributedDataParallel(module.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)
    times = {name: [] for name in configs}
    for step in range(args.warmup + args.steps):
        for name, config in configs.items():
            batches = _batches(1000 * step + rank, args.microbatches, args.pairs, args.seq, args.vocab)
            model.zero_grad_buffer()
            dist.barrier()
            start = time.perf_counter()
            forward_backward(model, batches, config.loss)
            finalize_model_grads([model])
            dist.barrier()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    out.put((rank, times))
    parallel.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per microbatch per rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--ranks", type=int, default=None,
                        help="data-parallel ranks (default 2; on CUDA one per GPU, at most 2)")
    args = parser.parse_args()
    if args.ranks is None:
        import torch

        args.ranks = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, os.path.join(tmp, "store"), args, out)) for r in range(args.ranks)]
        for p in procs:
            p.start()
        results = dict(out.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    times = results[0]
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.ranks} data-parallel rank(s), {args.microbatches} microbatches x {args.pairs} pairs per rank, "
          f"seq {args.seq}, "
          f"hidden {args.hidden}, {args.layers} layers; median of {args.steps} steps")
    for name, t in median.items():
        print(f"  {name:<20} {t * 1000:8.1f} ms/step")
    dp, gb = median["rpo_data_parallel"], median["rpo_global_batch"]
    print(f"rpo data_parallel / dpo        = {dp / median['dpo']:.3f}  (target <= 1.03)")
    print(f"rpo global_batch / data_parallel = {gb / dp:.3f}  (target <= 1.40)")


if __name__ == "__main__":
    main()
