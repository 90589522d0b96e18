"""Low-rank adapters against full fine-tuning: one training step's time and memory, and the plan.

On this machine (CPU, fp32): the same model, one packed microbatch of synthetic pairs, RPO with the
online reference, trained by one process per setting (fresh processes): every weight with a frozen
copy as the reference, or rank-``r`` adapters with the model as its own reference (adapters off).
Reported: the median step time and the process's peak RSS over the model's build (weights,
gradients, optimizer state, reference, activations), and LoRA / full ratios. Then the memory
plan's per-GPU figures, full vs LoRA, for the 8B and 70B recipes' models on 8 x 80 GB GPUs.

    python bench/lora.py                  # a 12-layer, 1024-wide model; about 2 minutes on 2 cores
    python bench/lora.py --rank 64 --layers 4
    python bench/lora.py --experts 8      # a mixture of 8 experts (top 2) per layer, every expert adapted
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(rank: int | None, shape: dict, store: str, length: int, pairs: int, steps: int, out) -> None:
    """One process: build, then ``1 + steps`` training steps; puts (median step s, peak RSS growth bytes,
    trainable parameters)."""
    warnings.simplefilter("ignore")  # megatron's notes on a CPU without transformer-engine
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_rpo import parallel
    from megatron_rpo.config import config_from_dict
    from megatron_rpo.data.packing import packed_length, token_fields
    from megatron_rpo.models import model_provider
    from megatron_rpo.training.optimizer import build_optimizer
    from megatron_rpo.training.step import train_step

    parallel.connect(init_method=f"file://{store}", rank=0, world_size=1)
    config = config_from_dict({
        "model": dict(shape, max_position_embeddings=length),
        "data": {"max_prompt_length": 64, "max_length": length},
        "loss": {"reference": "online", "weighting": "uniform"},
        "optimizer": {"optimizer": "adam", "lr": 1e-5},
        "lora": {"rank": rank} if rank else {},
        "train": {"micro_batch_size": pairs, "global_batch_size": pairs}})
    parallel.initialize(config.parallel)
    start = rss()
    module = model_provider(config)
    model = DistributedDataParallel(module.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)
    reference = None
    if rank is None:  # full fine-tuning: a frozen copy of the model is the reference
        reference = model_provider(config)
        reference.load_state_dict(module.state_dict())
        reference.requires_grad_(False).eval()
        reference = [reference]
    else:
        reference = [model]  # the policy with its adapters switched off
    optimizer = build_optimizer(config.optimizer, [model], bf16=False)
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(1, shape["vocab_size"], (length,), generator=g) for _ in range(2 * pairs)]
    batch = token_fields(sequences, [64] * len(sequences), packed=True, sequence_multiple=1,
                         length=packed_length([length] * len(sequences), 64, 1))
    batch.update(is_chosen=torch.arange(2 * pairs) < pairs, pair_id=torch.arange(2 * pairs) % pairs)
    times = []
    for step in range(1 + steps):
        t = time.perf_counter()
        train_step([model], optimizer, [batch], config.loss, reference=reference)
        if step:
            times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    out.put((statistics.median(times), peak_rss() - start, trainable))
    parallel.destroy()


def measure(rank: int, shape: dict, length: int, pairs: int, steps: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    experts = (f", {shape['num_moe_experts']} experts (top {shape['moe_router_topk']}) of width "
               f"{shape['moe_ffn_hidden_size']}" if shape.get("num_moe_experts") else "")
    print(f"CPU, fp32, {shape['num_layers']} layers, hidden {shape['hidden_size']}{experts}, vocab "
          f"{shape['vocab_size']}; RPO "
          f"(online reference) on one packed microbatch of {2 * pairs} sequences x {length} tokens, Adam; median of "
          f"{steps} steps; peak RSS from the model's build on")
    print(f"{'':>12}{'trainable':>14}{'ms/step':>10}{'peak MiB':>10}")
    rows = {}
    for name, r in (("full", None), (f"LoRA r={rank}", rank)):
        out = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            proc = ctx.Process(target=_run, args=(r, shape, os.path.join(tmp, "store"), length, pairs, steps, out))
            proc.start()
            rows[name] = out.get(timeout=3600)
            proc.join(timeout=60)
        step, peak, trainable = rows[name]
        print(f"{name:>12}{trainable:>14,}{step * 1000:>10.0f}{peak / 2**20:>10.0f}")
    (f_step, f_peak, _), (l_step, l_peak, _) = rows.values()
    print(f"LoRA / full: step time {l_step / f_step:.2f}, peak memory {l_peak / f_peak:.2f}")


def plans() -> None:
    """The memory plan, full vs LoRA, for the 8B and 70B recipes on 8 x 80 GB."""
    from megatron_rpo.config import load_config
    from megatron_rpo.plan import plan

    print("\nmemory plan per GPU, 8 x 80 GB (python -m megatron_rpo.plan), full fine-tuning vs LoRA rank 16, "
          "the online reference in both (a frozen copy for full fine-tuning):")
    print(f"{'recipe':>34}{'full':>10}{'LoRA':>10}{'LoRA / full':>13}")
    for recipe, extra in (("llama3_8b_rpo_tp2.yaml", []),
                          ("llama2_70b_rpo_lora_tp8.yaml", [])):
        path = os.path.join(REPO, "configs", recipe)
        lora = load_config(path, extra + ["lora.rank=16", "loss.reference=online"])
        full = load_config(path, extra + ["lora.rank=null", "loss.reference=online"])
        a, b = plan(full, 8, 80), plan(lora, 8, 80)
        print(f"{recipe:>34}{a.worst.total / 2**30:>9.1f}G{b.worst.total / 2**30:>9.1f}G"
              f"{b.worst.total / a.worst.total:>13.2f}" + ("" if a.fits else "   (full does not fit)"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=16, help="the adapters' rank (default 16)")
    p.add_argument("--layers", type=int, default=12, help="layers of the model (default 12)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024; FFN 2.75x, 16 heads)")
    p.add_argument("--length", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--pairs", type=int, default=2, help="pairs in the microbatch (default 2)")
    p.add_argument("--steps", type=int, default=3, help="measured steps (default 3)")
    p.add_argument("--experts", type=int, default=None,
                   help="a mixture of this many experts (top 2, each of width hidden / 2) in every layer")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    shape = dict(TINY, num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=int(2.75 * args.hidden),
                 num_attention_heads=16, num_query_groups=4)
    if args.experts:
        shape.update(num_moe_experts=args.experts, moe_router_topk=2, moe_ffn_hidden_size=args.hidden // 2,
                     moe_aux_loss_coeff=0.0)
    measure(args.rank, shape, args.length, args.pairs, args.steps)
    plans()


if __name__ == "__main__":
    main()
