"""Peak memory of the log-prob paths, forward + backward from the final hidden states, per rank.

* chunked: ``model.logprob_chunk_tokens`` (:func:`megatron_rpo.logprobs.output_logprobs` with a
  chunk): the output layer and the vocab-parallel log-softmax over chunks of tokens, each chunk's
  logits recomputed in backward; neither the whole logits nor their gradient exist.
* today: the same function without a chunk (the default): megatron's output layer makes this
  rank's [tokens, V / TP] logits whole, and megatron's vocab-parallel cross entropy works on them
  in place.
* naive: the output layer, then gather the full [tokens, V] logits on every rank,
  ``log_softmax``, ``gather`` the labels.

Each (path, vocabulary, tokens) runs in fresh processes (gloo on CPU; one GPU per rank under
CUDA). The figure is the rank's peak memory growth over what it held before the path ran (peak RSS
on CPU, ``max_memory_allocated`` on GPU); the output layer's weight and the hidden states are
allocated before. The ratios in one run are what to read. A case whose estimated peak exceeds the
memory at hand (CPU: what the two ranks share) is skipped and said so.

    python bench/logprob_memory.py [--tokens 8192 16384 32768] [--vocab 151936 128256]
        [--hidden 1024] [--chunk 1024] [--tensor-parallel-size 2] [--paths chunked today naive]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile

PATHS = ("chunked", "today", "naive")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rank(rank, world, store, path, vocab, tokens, hidden, chunk, out):
    import warnings

    warnings.simplefilter("ignore")  # megatron's notes about transformer-engine/apex fallbacks
    import torch
    from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from megatron_rpo import parallel
    from megatron_rpo.config import ParallelConfig
    from megatron_rpo.logprobs import output_logprobs

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    os.environ["LOCAL_RANK"] = str(rank)  # this rank's GPU under CUDA
    parallel.connect(init_method=f"file://{store}", rank=rank, world_size=world)
    parallel.initialize(ParallelConfig(tensor_model_parallel_size=world))
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # what training computes in
    config = ModelParallelConfig(tensor_model_parallel_size=world, params_dtype=dtype,
                                 use_cpu_initialization=not on_gpu)
    layer = ColumnParallelLinear(hidden, vocab, config=config, init_method=lambda w: torch.nn.init.normal_(w, 0, 0.02),
                                 bias=False, gather_output=False, skip_bias_add=True).to(device)
    shared = torch.Generator().manual_seed(0)  # what every tensor-parallel rank holds alike
    hidden_states = torch.randn(tokens, 1, hidden, generator=shared).to(device, dtype).requires_grad_()  # [s, b=1, h]
    labels = torch.randint(0, vocab, (1, tokens), generator=shared).to(device)
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()

    if path == "naive":
        logits, _ = layer(hidden_states)  # [s, 1, V/tp]
        full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)  # [s, 1, V]
        logps = torch.log_softmax(full.float(), dim=-1).gather(-1, labels.t()[..., None]).squeeze(-1).t()
    else:
        logps = output_logprobs(layer, hidden_states, None, labels, vocab, chunk if path == "chunked" else None)
    logps.sum().backward()

    if on_gpu:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    # plain floats: tensors would travel as file descriptors
    out.put((rank, peak, logps.detach().float().sum().item()))
    parallel_state.destroy_model_parallel()
    parallel.destroy()


def measure(path: str, vocab: int, tokens: int, hidden: int, chunk: int, world: int) -> tuple[int, float]:
    """Peak growth in bytes (the larger over the ranks) and rank 0's summed log-probs."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank, args=(r, world, store, path, vocab, tokens, hidden, chunk, out))
                 for r in range(world)]
        for p in procs:
            p.start()
        results = sorted(out.get(timeout=3600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            if p.exitcode:
                raise RuntimeError(f"{path} vocab {vocab} tokens {tokens}: a rank exited with {p.exitcode}")
    return max(r[1] for r in results), results[0][2]


def estimate(path: str, vocab: int, tokens: int, hidden: int, chunk: int, world: int, element: int) -> int:
    """Rough peak bytes per rank (to skip what cannot fit): the float32 logits the path holds at once,
    their gradient where it is not made in place, and the output weight's gradient."""
    shard = vocab // world
    weight_grad = shard * hidden * element
    if path == "chunked":
        return 3 * min(chunk, tokens) * shard * 4 + 2 * weight_grad + 2 * tokens * hidden * 4
    if path == "today":  # measured on CPU: 1.04 x the float32 logits
        return int(1.2 * tokens * shard * 4) + weight_grad + tokens * hidden * 4
    return 3 * tokens * vocab * 4 + tokens * shard * element + weight_grad


def available_bytes(world: int) -> tuple[int, str]:
    """Memory one rank may use: the GPU's, or the host's shared by ``world`` ranks."""
    import psutil
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.9), "GPU"
    return int(psutil.virtual_memory().available * 0.8 / world), "host, per rank"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768],
                        help="tokens in the microbatch (one packed row)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 128256], help="Qwen's and Llama-3's")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1024, help="model.logprob_chunk_tokens of the chunked path")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    args = parser.parse_args()
    import torch

    world = args.tensor_parallel_size
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise SystemExit(f"tensor-parallel size {world} needs {world} GPUs; this machine has "
                         f"{torch.cuda.device_count()} (--tensor-parallel-size 1, or run it on CPU)")
    element = 2 if torch.cuda.is_available() else 4
    limit, where = available_bytes(world)
    print(f"tensor-parallel size {world}, hidden {args.hidden}, chunk {args.chunk} tokens, "
          f"{'bf16' if element == 2 else 'fp32'}; peak memory growth per rank during forward + backward "
          f"(memory at hand: {limit / 2**30:.1f} GiB, {where})")
    header = f"{'vocab':>7} {'tokens':>7}" + "".join(f" {p + ' MiB':>12}" for p in args.paths)
    ratios = [p for p in args.paths if p != "today"] if "today" in args.paths else []
    print(header + "".join(f" {p + '/today':>14}" for p in ratios) + "  max |sum logp diff|")
    for vocab in args.vocab:
        for tokens in args.tokens:
            peaks, sums = {}, {}
            for path in args.paths:
                need = estimate(path, vocab, tokens, args.hidden, args.chunk, world, element)
                if need > limit:
                    peaks[path] = None
                    print(f"  (skipped {path} at vocab {vocab}, {tokens} tokens: needs about {need / 2**30:.1f} GiB "
                          f"per rank)")
                    continue
                peaks[path], sums[path] = measure(path, vocab, tokens, args.hidden, args.chunk, world)
            cells = "".join(f" {'-' if peaks[p] is None else f'{peaks[p] / 2**20:.0f}':>12}" for p in args.paths)
            today = peaks.get("today")
            cells += "".join(f" {'-' if today is None or peaks[p] is None else f'{peaks[p] / today:.3f}':>14}"
                             for p in ratios)
            diff = max((abs(a - b) for a in sums.values() for b in sums.values()), default=0.0)
            print(f"{vocab:>7} {tokens:>7}{cells}  {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
