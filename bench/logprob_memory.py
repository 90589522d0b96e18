"""Peak memory of our log-prob path against the naive one, at tensor-parallel size 2.

* ours: each rank keeps its vocabulary slice of the logits; megatron's vocab-parallel cross
  entropy works on it in place (:func:`megatron_rpo.logprobs.token_logprobs`).
* naive: gather the full logits on every rank, ``log_softmax``, ``gather`` the labels.

Both run forward + backward from the final hidden states through the output layer, on two
gloo processes (or two GPUs under torchrun with CUDA). Each (path, vocabulary) runs in fresh
processes; the figure is the rank's peak memory growth over what it held before the path ran
(peak RSS on CPU, ``max_memory_allocated`` on GPU). The ratio naive / ours is what to read.

    python bench/logprob_memory.py [--batch 4] [--seq 512] [--hidden 256] [--vocab 32000 128256]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rank(rank, store, path, vocab, batch, seq, hidden, out):
    import warnings

    import torch
    from megatron.core import parallel_state, tensor_parallel

    warnings.simplefilter("ignore")  # megatron's notes about transformer-engine/apex fallbacks

    from megatron_rpo import parallel
    from megatron_rpo.config import ParallelConfig
    from megatron_rpo.logprobs import sequence_logprobs, token_logprobs

    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(rank)  # this rank's GPU under CUDA
    parallel.connect(init_method=f"file://{store}", rank=rank, world_size=2)
    parallel.initialize(ParallelConfig(tensor_model_parallel_size=2))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shared = torch.Generator().manual_seed(0)  # what every tensor-parallel rank holds alike
    hidden_states = torch.randn(batch, seq, hidden, generator=shared).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=shared).to(device)
    own = torch.Generator().manual_seed(1 + rank)  # this rank's slice of the output layer
    weight = (torch.randn(vocab // 2, hidden, generator=own) * 0.02).to(device).requires_grad_()
    mask = torch.ones(batch, seq, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()

    logits = hidden_states @ weight.T  # [b, s, V/2]: this rank's slice, as the output layer makes it
    if path == "ours":
        logps, _ = sequence_logprobs(token_logprobs(logits, labels, vocab), mask)
    else:
        full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)  # [b, s, V]
        token = torch.log_softmax(full.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
        logps = (token * mask).sum(dim=1)
    logps.sum().backward()

    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    out.put((rank, peak, logps.detach().cpu().tolist()))  # plain floats: tensors would travel as fds
    parallel_state.destroy_model_parallel()
    parallel.destroy()


def measure(path: str, vocab: int, batch: int, seq: int, hidden: int) -> tuple[int, list[float]]:
    """Peak growth in bytes (the larger of the two ranks) and rank 0's log-probs."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_rank, args=(r, os.path.join(tmp, "store"), path, vocab, batch, seq, hidden, out))
            for r in range(2)
        ]
        for p in procs:
            p.start()
        results = sorted(out.get(timeout=600) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            if p.exitcode:
                raise RuntimeError(f"{path} vocab {vocab}: a rank exited with {p.exitcode}")
    return max(r[1] for r in results), results[0][2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    args = parser.parse_args()
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        raise SystemExit(f"tensor-parallel size 2 needs 2 GPUs; this machine has {torch.cuda.device_count()} "
                         "(run it on CPU, or on a machine with 2 or more)")
    print(f"tensor-parallel size 2, batch {args.batch} x seq {args.seq}, hidden {args.hidden}; "
          "peak memory growth per rank during forward + backward")
    print(f"{'vocab':>8} {'ours MiB':>10} {'naive MiB':>10} {'naive/ours':>11}  max |logp diff|")
    for vocab in args.vocab:
        ours, ours_logps = measure("ours", vocab, args.batch, args.seq, args.hidden)
        naive, naive_logps = measure("naive", vocab, args.batch, args.seq, args.hidden)
        diff = max(abs(a - b) for a, b in zip(ours_logps, naive_logps))
        print(f"{vocab:>8} {ours / 2**20:>10.1f} {naive / 2**20:>10.1f} {naive / ours:>11.2f}  {diff:.2e}")


if __name__ == "__main__":
    main()
