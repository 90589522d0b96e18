"""Train: ``python -m megatron_rpo.train --config FILE [section.key=value ...]`` (under torchrun for
several processes). Everything else lives in :mod:`megatron_rpo.training`."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_rpo.config import load_config
from megatron_rpo.errors import INPUT_ERROR_EXIT_CODE, InputError, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_rpo.train", description=__doc__)
    parser.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.beta=0.2 train.train_iters=10")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except InputError as e:
        report(e)
        return INPUT_ERROR_EXIT_CODE
    if "RANK" not in os.environ:
        print("no launcher environment (RANK is unset): training in this one process; for several, launch with "
              "torchrun --nproc-per-node N -m megatron_rpo.train ...", file=sys.stderr, flush=True)
    from megatron_rpo.training.interrupts import Preempted
    from megatron_rpo.training.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(config)
        trainer.train()
    except InputError as e:  # a bad input our checks found: say what, no traceback
        report(e)
        return INPUT_ERROR_EXIT_CODE
    except Preempted as e:  # stopped on a signal after saving (the trainer said so)
        return e.exit_code
    finally:
        if trainer is not None:
            trainer.close()
        else:
            from megatron_rpo import parallel

            parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
