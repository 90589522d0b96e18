#!/usr/bin/env python
"""Tokenise preference data into a Megatron IndexedDataset with metadata and a manifest.

    python tools/preprocess_preference_data.py --input data/hh_harmless_slice.jsonl --format hh \\
        --tokenizer tokenizer.model --output-prefix out/hh_train
    python tools/preprocess_preference_data.py --input Anthropic/hh-rlhf --split test \\
        --tokenizer tokenizer.model --output-prefix out/hh_test        # needs network access

Inputs: .jsonl / .jsonl.gz files; with the datasets library (pip install 'megatron_rpo[hf]') also
.parquet files, datasets save_to_disk folders, local dataset folders and hub names (owner/name or
hf://owner/name; --split picks the split). Without --format the format is detected from the columns.

Bad rows are skipped and listed in PREFIX.manifest.json (file, line, field, reason); with
--strict the first one is an error. See megatron_rpo/data/preprocess.py for the outputs.
"""

import argparse
import sys

from megatron_rpo.data.formats import FORMATS
from megatron_rpo.data.preprocess import preprocess
from megatron_rpo.errors import INPUT_ERROR_EXIT_CODE, InputError, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help=".jsonl/.jsonl.gz/.parquet files, datasets folders or hub names, read in order")
    p.add_argument("--split", default=None, help="split of dataset folders and hub datasets (e.g. train, test)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="hh: {chosen, rejected} dialogues; pairs: {prompt, chosen, rejected}; "
                        "unpaired: {prompt, completion, label}; tldr: Reddit TL;DR comparisons {info, summaries, choice}; "
                        "default: detected from the columns")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file or Hugging Face tokenizer directory")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.meta.npy/.prompts.jsonl/.manifest.json")
    p.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens kept, from the end (default 256)")
    p.add_argument("--max-length", type=int, default=512, help="prompt + response tokens kept (default 512)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template file for message lists (default: the tokenizer's; without one, "
                        "HH style, which the tool says)")
    p.add_argument("--keep-identical-pairs", action="store_true",
                   help="keep pairs whose chosen and rejected responses are the same (skipped by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        m = preprocess(a.input, a.format, a.tokenizer, a.output_prefix, max_prompt_length=a.max_prompt_length,
                       max_length=a.max_length, strict=a.strict, keep_identical_pairs=a.keep_identical_pairs,
                       progress=not a.no_progress, split=a.split, chat_template=a.chat_template).manifest
    except InputError as e:
        report(e)
        return INPUT_ERROR_EXIT_CODE
    if m["format_detected"]:
        print(f"format: {m['format']} (detected from the columns; --format to choose)")
    print(f"{m['num_sequences']} sequences ({m['num_pairs']} pairs, {m['num_prompts']} prompts) from {m['num_rows']} "
          f"rows; {m['num_skipped']} skipped, {m['truncated_prompts']} prompts and {m['truncated_responses']} "
          f"responses truncated -> {a.output_prefix}.{{bin,idx,meta.npy,prompts.jsonl,manifest.json}}")
    for s in m["skipped"][:10]:
        print(f"  skipped {s['file']}:{s['line']}: {s['field']}: {s['reason']}")
    if m["num_skipped"] > 10:
        print(f"  ... {m['num_skipped'] - 10} more in the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
