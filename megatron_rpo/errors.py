"""Bad inputs: the exception our checks raise, and how an entry point reports it (one line, once,
and where torchrun looks for it)."""

from __future__ import annotations

import json
import os
import sys
import time

__all__ = ["InputError", "INPUT_ERROR_EXIT_CODE", "report"]

INPUT_ERROR_EXIT_CODE = 2
"""What train, plan and the tools exit with after reporting an :class:`InputError` (argparse's code
for a bad command line)."""


class InputError(ValueError):
    """A config, file or argument that cannot work, found by our own checks: the message names the
    setting or file, its value and the fix. The entry points print it as one line; any other error
    (torch's, megatron's, a bug of ours) keeps its traceback."""


def report(error: InputError) -> None:
    """Say ``error: <message>`` for the job. Every rank finds the same bad input and rank 0 says it.
    Under torchrun each rank also records it in its error file, which torchrun's failure summary
    quotes (so an error only some rank saw is not lost): the message alone, as its "traceback",
    since a bad input is the user's to fix, not a stack to read."""
    message = f"error: {error}"
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        # torchrun's error-file format (torch.distributed.elastic's ErrorHandler.record_exception)
        # with the message where it would put the Python stack.
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                     "timestamp": str(int(time.time()))}}}, f)
