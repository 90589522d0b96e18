"""megatron_rpo: Relative Preference Optimization on Megatron-core."""

import warnings

import torch

if not torch.cuda.is_available():
    # On CPU megatron-core announces at import that it falls back from transformer-engine and
    # apex; that is the expected configuration there, not news for every tool run.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex)( and Apex)? (is|are) not installed")
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")
