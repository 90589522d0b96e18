"""Data pipeline throughput, measured in one run.

* preprocessing: rows/s of tools' ``preprocess`` (parse, tokenise, truncate, write).
* prompt embeddings: our precompute (each distinct prompt once) against a plain
  sentence-transformers encode of every sequence's prompt (what the paper's code does inside
  the training loop). Reported as sequences covered per second and the ratio.

    python bench/data_pipeline.py [--input ../shared/data/hh_harmless_sample.jsonl] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from megatron_rpo.data.embeddings import load_encoder, precompute_prompt_embeddings
from megatron_rpo.data.preprocess import preprocess
from megatron_rpo.data.tokenizer import train_sentencepiece

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_INPUT = os.path.join(HERE, "..", "..", "shared", "data", "hh_harmless_sample.jsonl")
if not os.path.exists(DEFAULT_INPUT):
    DEFAULT_INPUT = os.path.join(HERE, "..", "data", "hh_harmless_slice.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=DEFAULT_INPUT)
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, open(args.input) as f:
        rows = [json.loads(line) for line in f]
        tokenizer = train_sentencepiece([r["chosen"] for r in rows], os.path.join(tmp, "sp"), vocab_size=2000)
        prefix = os.path.join(tmp, "ds")
        start = time.perf_counter()
        m = preprocess([args.input], "hh", tokenizer, prefix, progress=False).manifest
        t_pre = time.perf_counter() - start

        start = time.perf_counter()
        precompute_prompt_embeddings(prefix, batch_size=args.batch_size, device=args.device, progress=False)
        t_ours = time.perf_counter() - start

        with open(f"{prefix}.prompts.jsonl") as f:
            prompts = [json.loads(line) for line in f]
        import numpy as np

        prompt_ids = np.load(f"{prefix}.meta.npy")["prompt_id"]
        every = [prompts[i] for i in prompt_ids]  # one per sequence, duplicates included
        encoder = load_encoder(device=args.device)
        start = time.perf_counter()
        encoder.encode(every, batch_size=args.batch_size, normalize_embeddings=True, show_progress_bar=False)
        t_plain = time.perf_counter() - start

    n = m["num_sequences"]
    print(f"input {os.path.basename(args.input)}: {m['num_rows']} rows, {n} sequences, {m['num_prompts']} distinct prompts")
    print(f"preprocess: {m['num_rows'] / t_pre:8.0f} rows/s  ({t_pre:.2f} s)")
    print(f"embeddings, ours (distinct prompts once): {n / t_ours:8.0f} sequences/s  ({t_ours:.2f} s, includes model load)")
    print(f"embeddings, plain encode of every prompt: {n / t_plain:8.0f} sequences/s  ({t_plain:.2f} s)")
    print(f"speed-up ours / plain = {t_plain / t_ours:.2f}")


if __name__ == "__main__":
    main()
