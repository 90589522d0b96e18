#!/usr/bin/env python
"""Convert a Megatron checkpoint (converted or trained with megatron_rpo) back to Hugging Face format.

    python tools/convert_megatron_to_hf.py --megatron-dir runs/rpo/export --output-dir hf_out

The output (safetensors + config.json + tokenizer) loads with transformers.AutoModelForCausalLM.
"""

import argparse
import sys

from megatron_rpo.convert import convert_megatron_to_hf
from megatron_rpo.errors import INPUT_ERROR_EXIT_CODE, InputError, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron-dir", required=True)
    p.add_argument("--output-dir", required=True, help="must not exist or be empty")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        config = convert_megatron_to_hf(a.megatron_dir, a.output_dir, progress=not a.no_progress)
    except InputError as e:
        report(e)
        return INPUT_ERROR_EXIT_CODE
    print(f"{config['architectures'][0]} -> {a.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
