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
    *,
    paired: bool,
    chosen_logps: torch.Tensor | None = None,
    rejected_logps: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Reward means, margin, accuracy (paired) or reward AUC, and contrast-matrix statistics.

    Args:
        chosen_rewards: [M] rewards of the chosen sequences.
        rejected_rewards: [N] rewards of the rejected sequences.
        weights: the [M, N] contrast weights, if the loss used a matrix.
        paired: chosen i and rejected i answer the same prompt (paired data). Said by the
            caller, never guessed from the shapes: an unpaired step may hold as many chosen as
            rejected items, and their "diagonal" pairs unrelated prompts.

    Raises:
        ValueError: ``paired`` with M != N.

    Returns:
        Float32 0-dim tensors (NaN where a quantity does not exist, e.g. the chosen mean of an
        empty side, or accuracy of unpaired data):

        * ``chosen_reward``, ``rejected_reward``: means of each side;
        * ``reward_margin``: ``chosen_reward - rejected_reward``;
        * ``accuracy``: fraction of pairs i with chosen reward above rejected reward, ties
          counting half (paired data: the diagonal of the matrix; NaN for unpaired data);
        * ``reward_auc``: fraction of all M x N (chosen, rejected) cells where the chosen reward is
          higher, ties counting half -- the AUC of the rewards as a chosen/rejected classifier,
          which is what unpaired data can measure;
        * ``diag_weight``: mean of the diagonal weights (paired data);
        * ``row_entropy``: mean row entropy of the weights in nats (``log N`` = uniform);
        * ``matrix_rows``, ``matrix_cols``: M and N;
        * ``chosen_logps``, ``rejected_logps``: mean policy log-prob of each side (when given).
    """
    c = chosen_rewards.detach().float()
    r = rejected_rewards.detach().float()
    nan = c.new_tensor(float("nan"))
    if paired and c.shape != r.shape:
        raise ValueError(f"paired metrics need as many chosen as rejected rewards, got {c.numel()} and {r.numel()}")
    diagonal = paired and c.numel() > 0
    cells = c[:, None] - r[None, :]  # [M], [N] -> [M, N]
    out = {
        "chosen_reward": c.mean() if c.numel() else nan,
        "rejected_reward": r.mean() if r.numel() else nan,
        # Ties count half: at step 0 (policy == reference) every reward is 0 and accuracy is chance.
        "accuracy": ((c > r).float() + 0.5 * (c == r).float()).mean() if diagonal else nan,
        "reward_auc": ((cells > 0).float() + 0.5 * (cells == 0).float()).mean() if cells.numel() else nan,
        "matrix_rows": c.new_tensor(float(c.numel())),
        "matrix_cols": c.new_tensor(float(r.numel())),
    }
    out["reward_margin"] = out["chosen_reward"] - out["rejected_reward"]
    for key, logps in (("chosen_logps", chosen_logps), ("rejected_logps", rejected_logps)):
        if logps is not None:
            out[key] = logps.detach().float().mean() if logps.numel() else nan
    if weights is not None:
        w = weights.detach().float()
        out["diag_weight"] = w.diagonal().mean() if diagonal else nan
        out["row_entropy"] = row_entropy(w)
    return {k: v.float() for k, v in out.items()}
