"""megatron_rpo: Relative Preference Optimization on Megatron-core."""

import logging
import warnings

import torch

from megatron_rpo.versions import missing_triton

_triton = missing_triton()
if _triton:  # said here, before megatron-core's own import chain fails on it
    raise ImportError(_triton)

if not torch.cuda.is_available():
    # On CPU megatron-core announces at import that it falls back from transformer-engine and
    # apex; that is the expected configuration there, not news for every tool run.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex)( and Apex)? (is|are) not installed")
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")
    # No CUDA connections to limit on CPU (megatron's tensor-parallel layers ask for it on every build).
    warnings.filterwarnings("ignore", message=r"When using (sequence parallelism|async grad allreduce) it is "
                                              r"recommended to set the environment variable "
                                              r"CUDA_DEVICE_MAX_CONNECTIONS")
# Warnings from inside torch and megatron that a user cannot act on. They carry no module of
# theirs (they surface through megatron_rpo/cpu.py's device mode on CPU), so by message:
# megatron's dist_checkpointing loads through torch's ShardedTensor, which torch deprecates, and
# its optimizers' zero_grad asks every parameter view for a .grad, which torch flags for views;
# megatron calls torch.distributed collectives that torch has renamed.
warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor")
warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor is being")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                                          r"deprecated")
# megatron-core 0.19 asks for a rank wherever its datasets code runs outside torch.distributed (the
# preprocessing and embedding tools, one process): rank 0 is the right answer there.
warnings.filterwarnings("ignore", message=r"Could not determine rank from torch\.distributed")
# Deprecation notices from inside torch and megatron-core are for their developers, not for ours.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|megatron)(\.|$)")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(torch|megatron)(\.|$)")


class _DropNotice(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


# megatron-core 0.19 logs at every model build (policy, reference, each virtual stage) that GPTModel
# is deprecated in favour of HybridModel; docs/versions.md says what its removal will change.
logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(_DropNotice("GPTModel IS DEPRECATED"))
