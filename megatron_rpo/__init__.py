"""megatron_rpo: Relative Preference Optimization on Megatron-core."""

import warnings

import torch

if not torch.cuda.is_available():
    # On CPU megatron-core announces at import that it falls back from transformer-engine and
    # apex; that is the expected configuration there, not news for every tool run.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex)( and Apex)? (is|are) not installed")
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")
# Warnings from inside torch and megatron that a user cannot act on. They carry no module of
# theirs (they surface through megatron_rpo/cpu.py's device mode on CPU), so by message:
# megatron's dist_checkpointing loads through torch's ShardedTensor, which torch deprecates, and
# its optimizers' zero_grad asks every parameter view for a .grad, which torch flags for views.
warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating ShardedTensor")
warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor is being")
