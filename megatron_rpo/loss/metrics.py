"""What a user watches during preference training (pure math, detached).

Rewards are ``beta * delta`` for reference-based losses (as TRL and the paper's code report
them) and SimPO's ``beta / |y| * policy_logp`` for reference-free ones; callers pass them in.
"""

from __future__ import annotations

import torch

from megatron_rpo.loss.contrast import row_entropy

__all__ = ["preference_metrics"]


@torch.no_grad()
def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Reward means, margin, paired accuracy and contrast-matrix statistics.

    Args:
        chosen_rewards: [M] rewards of the chosen sequences.
        rejected_rewards: [N] rewards of the rejected sequences.
        weights: the [M, N] contrast weights, if the loss used a matrix.

    Returns:
        Float32 0-dim tensors (NaN where a quantity does not exist, e.g. the chosen mean of an
        empty side, or accuracy of unpaired data):

        * ``chosen_reward``, ``rejected_reward``: means of each side;
        * ``reward_margin``: ``chosen_reward - rejected_reward``;
        * ``accuracy``: fraction of pairs i with chosen reward above rejected reward, ties
          counting half (paired data, M == N: the diagonal of the matrix);
        * ``diag_weight``: mean of the diagonal weights (M == N);
        * ``row_entropy``: mean row entropy of the weights in nats (``log N`` = uniform);
        * ``matrix_rows``, ``matrix_cols``: M and N.
    """
    c = chosen_rewards.detach().float()
    r = rejected_rewards.detach().float()
    nan = c.new_tensor(float("nan"))
    paired = c.shape == r.shape and c.numel() > 0
    out = {
        "chosen_reward": c.mean() if c.numel() else nan,
        "rejected_reward": r.mean() if r.numel() else nan,
        # Ties count half: at step 0 (policy == reference) every reward is 0 and accuracy is chance.
        "accuracy": ((c > r).float() + 0.5 * (c == r).float()).mean() if paired else nan,
        "matrix_rows": c.new_tensor(float(c.numel())),
        "matrix_cols": c.new_tensor(float(r.numel())),
    }
    out["reward_margin"] = out["chosen_reward"] - out["rejected_reward"]
    if weights is not None:
        w = weights.detach().float()
        square = w.dim() == 2 and w.shape[0] == w.shape[1] and w.numel() > 0
        out["diag_weight"] = w.diagonal().mean() if square else nan
        out["row_entropy"] = row_entropy(w)
    return {k: v.float() for k, v in out.items()}
