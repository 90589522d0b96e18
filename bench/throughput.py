"""Useful tokens per second: packed microbatches against padding, and against a plain PyTorch DPO loop.

Real HH dialogues (the bundled slice, ``data/hh_harmless_slice.jsonl``; ``--input`` for another
file of the same format), tokenised with a real English vocabulary: the WordPiece one that ships with the
bundled all-MiniLM-L6-v2 embedding model (close to Llama/Mistral granularity), preprocessed by
our own pipeline with the paper's limits (prompt 256, total 512 tokens). Every configuration
trains on the same samples, step by step, interleaved, so machine noise hits them alike:

* ``pad_to_max``: every sequence padded to ``max_length`` (``data.packing: false``);
* ``pad_to_longest``: every microbatch padded to its own longest sequence;
* ``packed``: each microbatch's sequences back to back in one row (``data.packing: true``);
* ``plain`` (with ``--plain``, on by default with ``--gpu``): a plain PyTorch + transformers
  DPO loop on the same pairs -- ``LlamaForCausalLM`` with sdpa attention, the reference
  forward under ``no_grad``, padding each microbatch to its longest sequence as such loops do,
  fused AdamW; bf16 on GPU.

A step is RPO (online reference, the matrix over the microbatch) forward-backward over the
step's microbatches, the gradient reduction and the optimizer step. Reported: the median step
time, **useful tokens/s** (prompt and response tokens of real sequences; padding never counts),
peak memory per useful token (GPU: the step's peak allocation; CPU: the peak RSS growth of a
fresh process running that configuration), and the ratios; TFLOP/s and (with ``--gpu``) MFU
counting useful tokens only, as the trainer's log line does (megatron_rpo/models/flops.py: 6N per
token for the policy, 2N for the reference's forward, plus causal attention), against the GPU's
peak dense bf16 rate (``--peak-tflops`` to override).

``--profile`` adds a torch.profiler trace of two packed steps (and two plain ones): the top
operators by self time on the device and the fraction of the step the device sat idle (host
gaps). Targets: packed / pad_to_max >= 2.5x useful tokens/s; on one H100-class GPU
packed >= 2x the plain loop, pad_to_longest >= 1.0x it (equal padded work), and peak memory per
useful token of packed no worse than pad_to_longest.

Context parallelism has its own benchmark, ``bench/context_parallel.py``.

    python bench/throughput.py                      # CPU, tiny model, about 3 minutes on 2 cores
    python bench/throughput.py --gpu [--profile]    # CUDA: the 1.1B Llama shape, bf16
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_INPUT = os.path.join(HERE, "..", "data", "hh_harmless_slice.jsonl")

MODES = ("pad_to_max", "pad_to_longest", "packed")
# Model shapes: a tiny one for CPU, and the 1.1B Llama shape (TinyLlama's) for GPU.
TINY = dict(num_layers=2, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4, num_query_groups=2,
            vocab_size=30522, max_position_embeddings=512)
LLAMA_1B = dict(num_layers=22, hidden_size=2048, ffn_hidden_size=5632, num_attention_heads=32, num_query_groups=4,
                vocab_size=32000, max_position_embeddings=2048)


# -- data ---------------------------------------------------------------------------------------------
def prepare(input_path: str, workdir: str, max_prompt_length: int, max_length: int, device: str) -> str:
    """Preprocess ``input_path`` with the bundled WordPiece vocabulary; returns the dataset prefix."""
    import json
    import shutil

    from megatron_rpo.data.embeddings import precompute_prompt_embeddings, resolve_model
    from megatron_rpo.data.preprocess import preprocess

    # BERT's vocabulary names no bos/eos; its [CLS]/[SEP] play those parts (one token each, as in Llama's).
    tokenizer = os.path.join(workdir, "wordpiece")
    os.makedirs(tokenizer)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(resolve_model("all-MiniLM-L6-v2"), name), tokenizer)
    path = os.path.join(tokenizer, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump(dict(cfg, bos_token="[CLS]", eos_token="[SEP]"), f)
    prefix = os.path.join(workdir, "hh")
    preprocess([input_path], "hh", tokenizer, prefix, max_prompt_length=max_prompt_length, max_length=max_length,
               progress=False)
    precompute_prompt_embeddings(prefix, device=device, progress=False)
    return prefix


def step_indices(num_pairs: int, steps: int, microbatches: int, pairs: int, seed: int = 0) -> list[list[list[int]]]:
    """For each step, its microbatches as sequence indices (chosen first), cycling through shuffled pairs."""
    order = np.random.default_rng(seed).permutation(num_pairs)
    need = steps * microbatches * pairs
    order = np.resize(order, need)
    out = []
    for s in range(steps):
        mbs = []
        for m in range(microbatches):
            chunk = order[(s * microbatches + m) * pairs:][:pairs]
            mbs.append([int(2 * p) for p in chunk] + [int(2 * p + 1) for p in chunk])
        out.append(mbs)
    return out


def host_batches(dataset, indices: list[list[int]], mode: str, max_length: int) -> list[dict]:
    from megatron_rpo.data.dataset import collate, collate_step

    if mode == "pad_to_longest":
        lengths = np.minimum(dataset.tokens.sequence_lengths, max_length)
        return [collate(dataset, mb, int(lengths[mb].max())) for mb in indices]
    return collate_step(dataset, indices, max_length, packing=mode == "packed")


def useful(dataset, indices: list[list[int]], max_length: int) -> tuple[int, int]:
    """(real tokens, sum of squared sequence lengths) of a step."""
    lengths = np.minimum(dataset.tokens.sequence_lengths, max_length)[[i for mb in indices for i in mb]]
    return int(lengths.sum()), int((lengths.astype(np.int64) ** 2).sum())


# -- megatron_rpo ---------------------------------------------------------------------------------------
class Ours:
    """Policy (DDP) + online reference + megatron's optimizer, stepping RPO on host microbatches."""

    def __init__(self, shape: dict, max_length: int, bf16: bool):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from megatron_rpo import parallel
        from megatron_rpo.config import config_from_dict
        from megatron_rpo.models import model_provider
        from megatron_rpo.training.optimizer import build_optimizer

        self.config = config_from_dict({
            "model": shape, "data": dict(max_prompt_length=max_length // 2, max_length=max_length),
            "loss": dict(loss_type="rpo", reference="online"), "optimizer": dict(optimizer="adam", lr=1e-6)})
        parallel.initialize(self.config.parallel)
        self.module = model_provider(self.config, bf16=bf16)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        self.model = DistributedDataParallel(self.module.config, ddp_config, self.module)
        self.reference = model_provider(self.config, bf16=bf16).requires_grad_(False).eval()
        self.optimizer = build_optimizer(self.config.optimizer, [self.model], bf16=bf16)

    def step(self, batches: list[dict]) -> None:
        from megatron_rpo.training.step import train_step

        train_step([self.model], self.optimizer, batches, self.config.loss, reference=self.reference)


# -- the plain loop -------------------------------------------------------------------------------------
class Plain:
    """transformers' LlamaForCausalLM, a no-grad reference copy, DPO on each microbatch padded to its longest."""

    def __init__(self, shape: dict, device, bf16: bool, beta: float = 0.1):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                          intermediate_size=shape["ffn_hidden_size"], num_hidden_layers=shape["num_layers"],
                          num_attention_heads=shape["num_attention_heads"],
                          num_key_value_heads=shape["num_query_groups"],
                          max_position_embeddings=shape["max_position_embeddings"], attn_implementation="sdpa")
        dtype = torch.bfloat16 if bf16 else torch.float32
        self.policy = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
        self.reference = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=1e-6, fused=True)
        self.device, self.beta = device, beta

    def _logps(self, model, batch):
        import torch

        logits = model(input_ids=batch["tokens"], attention_mask=batch["attention_mask"]).logits.float()
        token = torch.gather(logits.log_softmax(-1), 2, batch["labels"].unsqueeze(-1)).squeeze(-1)
        return (token * batch["loss_mask"]).sum(-1)

    def step(self, batches: list[dict]) -> None:
        import torch
        import torch.nn.functional as F

        self.optimizer.zero_grad(set_to_none=True)
        for host in batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            with torch.no_grad():
                ref = self._logps(self.reference, batch)
            delta = self._logps(self.policy, batch) - ref
            half = delta.shape[0] // 2
            loss = -F.logsigmoid(self.beta * (delta[:half] - delta[half:])).mean() / len(batches)
            loss.backward()
        self.optimizer.step()


def plain_batches(padded: list[dict], dataset, indices: list[list[int]], max_length: int) -> list[dict]:
    """The pad-to-longest microbatches with the attention mask a transformers loop passes."""
    import torch

    lengths = np.minimum(dataset.tokens.sequence_lengths, max_length)
    out = []
    for batch, mb in zip(padded, indices):
        width = batch["tokens"].shape[1]
        mask = torch.arange(width)[None, :] < torch.from_numpy(lengths[mb].astype(np.int64))[:, None]
        out.append({"tokens": batch["tokens"], "labels": batch["labels"], "loss_mask": batch["loss_mask"],
                    "attention_mask": mask.long()})
    return out


# -- measurement ----------------------------------------------------------------------------------------
def _sync(gpu: bool) -> None:
    if gpu:
        import torch

        torch.cuda.synchronize()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _runners(names, shape, args, gpu):
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    runners = {}
    if any(n in MODES for n in names):
        runners["ours"] = Ours(shape, args.max_length, bf16=gpu)
    if "plain" in names:
        runners["plain"] = Plain(shape, device, bf16=gpu)
    return runners


def _run_one(name, runners, dataset, indices, args):
    if name == "plain":
        padded = host_batches(dataset, indices, "pad_to_longest", args.max_length)
        runners["plain"].step(plain_batches(padded, dataset, indices, args.max_length))
    else:
        runners["ours"].step(host_batches(dataset, indices, name, args.max_length))


def _memory_probe(name, prefix, shape, args, store, out):
    """CPU: peak RSS growth of one step of ``name`` in a fresh process (after one warm-up step)."""
    import torch

    from megatron_rpo import parallel
    from megatron_rpo.data.dataset import PreferenceDataset

    warnings.simplefilter("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    parallel.connect(init_method=f"file://{store}", rank=0, world_size=1)
    dataset = PreferenceDataset(prefix, embeddings=True)
    runners = _runners([name], shape, args, gpu=False)
    steps = step_indices(dataset.manifest["num_pairs"], 2, args.microbatches, args.pairs)
    _run_one(name, runners, dataset, steps[0], args)  # optimizer state, caches
    before = rss()
    _run_one(name, runners, dataset, steps[1], args)
    out.put((name, max(0, peak_rss() - before), useful(dataset, steps[1], args.max_length)[0]))
    parallel.destroy()


def cpu_memory(names, prefix, shape, args) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    result = {}
    for name in names:
        out = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            p = ctx.Process(target=_memory_probe, args=(name, prefix, shape, args, os.path.join(tmp, "store"), out))
            p.start()
            got, peak, tokens = out.get(timeout=3600)
            p.join(timeout=60)
        result[got] = peak / tokens
    return result


def profile(names, runners, dataset, steps, args, gpu: bool) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sort = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    for name in [n for n in ("packed", "plain") if n in names]:
        _sync(gpu)
        start = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            for indices in steps[:2]:
                _run_one(name, runners, dataset, indices, args)
            _sync(gpu)
        wall = time.perf_counter() - start
        print(f"\n--- profile: {name}, 2 steps, {wall * 1000:.0f} ms wall ---")
        print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60))
        if gpu:
            busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
            print(f"device busy {busy * 1000:.0f} ms of {wall * 1000:.0f} ms wall: idle (host gaps) "
                  f"{max(0.0, 1 - busy / wall):.0%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=DEFAULT_INPUT)
    p.add_argument("--gpu", action="store_true", help="CUDA, the 1.1B Llama shape in bf16, and the plain loop")
    p.add_argument("--plain", action="store_true", help="also the plain PyTorch loop on CPU (always with --gpu)")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default: 8 on GPU, 4 on CPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--pairs", type=int, default=None, help="pairs per microbatch (default: 8 on GPU, 4 on CPU)")
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    import torch

    from megatron_rpo import parallel
    from megatron_rpo.config import ModelConfig
    from megatron_rpo.data.dataset import PreferenceDataset
    from megatron_rpo.models.flops import peak_tflops, step_flops

    gpu = args.gpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    args.steps = args.steps or (8 if gpu else 4)
    args.pairs = args.pairs or (8 if gpu else 4)
    shape = LLAMA_1B if gpu else TINY
    names = list(MODES) + (["plain"] if gpu or args.plain else [])
    with tempfile.TemporaryDirectory() as tmp:
        prefix = prepare(args.input, tmp, args.max_prompt_length, args.max_length, "cuda" if gpu else "cpu")
        dataset = PreferenceDataset(prefix, embeddings=True)
        lengths = np.minimum(dataset.tokens.sequence_lengths, args.max_length)
        print(f"{os.path.basename(args.input)}: {len(lengths)} sequences, WordPiece tokens: mean {lengths.mean():.0f}, "
              f"median {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f} (cut at {args.max_length})")
        memory = cpu_memory(names, prefix, shape, args) if not gpu else {}

        parallel.connect(init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        runners = _runners(names, shape, args, gpu)
        steps = step_indices(dataset.manifest["num_pairs"], args.warmup + args.steps, args.microbatches, args.pairs)
        times = {n: [] for n in names}
        peaks = {n: [] for n in names}
        for s, indices in enumerate(steps):
            for name in names:
                _sync(gpu)
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                start = time.perf_counter()
                _run_one(name, runners, dataset, indices, args)
                _sync(gpu)
                if s >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                    if gpu:
                        peaks[name].append((torch.cuda.max_memory_allocated() - before) / useful(
                            dataset, indices, args.max_length)[0])
        measured = steps[args.warmup:]
        tokens = sum(useful(dataset, i, args.max_length)[0] for i in measured)
        squares = sum(useful(dataset, i, args.max_length)[1] for i in measured)
        if gpu:
            memory = {n: statistics.median(v) for n, v in peaks.items()}
        per_step = {n: statistics.median(t) for n, t in times.items()}
        rate = {n: tokens / sum(t) for n, t in times.items()}

        device = torch.cuda.get_device_name() if gpu else "CPU"
        m = shape
        flops = step_flops(ModelConfig(**m), tokens, squares, reference_forward=True)
        peak = args.peak_tflops or (peak_tflops(device) if gpu else None)
        print(f"{device}; {m['num_layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}"
              f"{', bf16' if gpu else ', fp32'}; RPO with online reference; {args.microbatches} microbatches x "
              f"{args.pairs} pairs per step; median of {args.steps} interleaved steps; {tokens / len(measured):.0f} "
              f"useful tokens per step")
        print(f"{'config':<16}{'ms/step':>10}{'useful tok/s':>14}{'TFLOP/s':>10}{'MFU':>8}{'peak mem/useful tok':>22}")
        for n in names:
            tflops = flops / sum(times[n]) / 1e12
            mfu = f"{tflops / peak:.0%}" if gpu and peak else "-"
            mem = f"{memory[n] / 1024:.1f} KiB" if n in memory else "-"
            print(f"{n:<16}{per_step[n] * 1000:>10.1f}{rate[n]:>14.0f}{tflops:>10.2f}{mfu:>8}{mem:>22}")
        print(f"packed / pad_to_max         useful tokens/s = {rate['packed'] / rate['pad_to_max']:.2f}"
              "  (target >= 2.5)")
        print(f"packed / pad_to_longest     useful tokens/s = {rate['packed'] / rate['pad_to_longest']:.2f}")
        print(f"packed / pad_to_longest  peak memory/token  = "
              f"{memory['packed'] / memory['pad_to_longest']:.2f}  (target <= 1.0)")
        if "plain" in names:
            print(f"packed / plain              useful tokens/s = {rate['packed'] / rate['plain']:.2f}"
                  "  (target >= 2, GPU)")
            print(f"pad_to_longest / plain (equal padded work)  = {rate['pad_to_longest'] / rate['plain']:.2f}"
                  f"  (target >= 1.0, GPU)")
        if args.profile:
            profile(names, runners, dataset, measured, args, gpu)
        parallel.destroy()


if __name__ == "__main__":
    main()
