"""Preference losses on per-sequence log-probabilities (pure math, no torch.distributed).

Notation (docs/loss.md): for sequence k, ``delta_k = policy_logp_k - ref_logp_k`` is its
log-ratio; chosen rows i = 1..M, rejected columns j = 1..N; ``w`` are the contrast weights of
:mod:`megatron_rpo.loss.contrast`.

* RPO: ``L_RPO = -(1/(M N)) sum_ij log sigmoid(beta * w_ij * (delta_c_i - delta_r_j))``.
* DPO: ``-(1/M) sum_i log sigmoid(beta * (delta_c_i - delta_r_i))`` (paired).
* IPO: ``(1/M) sum_i ((delta_c_i - delta_r_i) - 1/(2 beta))^2`` (paired).
* SimPO (reference-free): rewards ``r_k = beta / |y_k| * policy_logp_k``;
  ``-(1/M) sum_i log sigmoid(r_c_i - r_r_i - gamma)`` (paired).
* SimPO + RPO: the contrast matrix over SimPO rewards,
  ``-(1/(M N)) sum_ij log sigmoid(w_ij * (r_c_i - r_r_j - gamma))``; with weight 1 on a
  single pair it is SimPO.
* Diagonal weights in the paper's released form (``diagonal_form="released"``, the code's
  ``RPODiagonalTrainer``): the weights multiply the losses instead of the logits,
  ``(1/M) sum_i [alpha l(beta L_ii) + (1 - alpha) mean_{j != i} l(beta L_ij)]`` with
  ``l = -log sigmoid``; a single pair is DPO (the released code returns NaN there).
* IPO with ``length_normalized=True`` (TRL's): log-ratios divided by the response length.
* KTO (Ethayarajh et al. 2024, arXiv 2402.01306) on unpaired items, desirable i and undesirable j:
  ``(sum_i lambda_D (1 - sigmoid(beta (delta_c_i - z0))) + sum_j lambda_U (1 - sigmoid(beta (z0 - delta_r_j))))
  / (M + N)``, with the reference point ``z0 = max(0, mean_k delta_kl_k)`` over mismatched
  (prompt, completion) pairs, detached (:func:`kto_reference_point`).

Every loss is computed in float32 (float64 for float64 inputs) whatever the input dtype and
returns a 0-dim tensor. An empty side (M = 0 or N = 0) has no cell to contrast: the loss is
0, still attached to the inputs so that ``backward()`` works and gives zero gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_rpo.loss.contrast import check_logratios, compute_dtype, contrast_weights

__all__ = ["rpo_loss", "dpo_loss", "ipo_loss", "simpo_rewards", "simpo_loss", "simpo_rpo_loss", "kto_reference_point",
           "kto_loss"]


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_paired(chosen: torch.Tensor, rejected: torch.Tensor, loss: str) -> None:
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"{loss} needs paired data: chosen and rejected of the same shape [M], "
            f"got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )


def _empty_loss(*tensors: torch.Tensor) -> torch.Tensor:
    # Zero, but part of the graph: a rank whose matrix is empty still runs backward.
    return sum(t.sum() * 0.0 for t in tensors).to(compute_dtype(*tensors))


DIAGONAL_FORMS = ("equations", "released")


def _contrast_loss(chosen_scores, rejected_scores, weights, margin=0.0, weights_outside: bool = False) -> torch.Tensor:
    """``-mean_ij log sigmoid(w_ij * (c_i - r_j - margin))`` over the [M, N] matrix; with
    ``weights_outside``, ``-mean_i sum_j w_ij log sigmoid(c_i - r_j - margin)`` (rows sum to 1)."""
    logits = chosen_scores[:, None] - rejected_scores[None, :] - margin  # [M], [N] -> [M, N]
    if weights_outside:
        return -(weights * F.logsigmoid(logits)).sum(dim=1).mean()
    return -F.logsigmoid(weights * logits).mean()


def _weights_outside(weighting: str, diagonal_form: str, row_normalization: str) -> bool:
    if diagonal_form not in DIAGONAL_FORMS:
        raise ValueError(f"diagonal_form must be one of {DIAGONAL_FORMS}, got {diagonal_form!r}")
    if diagonal_form == "released" and (weighting != "diagonal" or row_normalization != "sum"):
        raise ValueError(f'diagonal_form="released" is the diagonal weighting with rows summing to 1; got '
                         f"weighting={weighting!r}, row_normalization={row_normalization!r}")
    return diagonal_form == "released"


def rpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_prompt_emb: torch.Tensor | None = None,
    rejected_prompt_emb: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    weighting: str = "embedding",
    tau: float = 0.5,
    alpha: float = 0.8,
    row_normalization: str = "sum",
    diagonal_form: str = "equations",
) -> torch.Tensor:
    """Relative Preference Optimization loss over the M x N contrast matrix.

    ``L = -(1/(M N)) sum_ij log sigmoid(beta * w_ij * (delta_c_i - delta_r_j))``.

    Args:
        chosen_logratios: [M] policy minus reference log-prob of each chosen sequence.
        rejected_logratios: [N] the same for each rejected sequence.
        chosen_prompt_emb: [M, D] prompt embeddings of the chosen rows (``embedding`` weighting).
        rejected_prompt_emb: [N, D] prompt embeddings of the rejected columns.
        beta: inverse temperature, > 0.
        weighting: ``embedding``, ``uniform`` or ``diagonal`` (paired, M == N).
        tau: temperature of the embedding softmax, > 0.
        alpha: diagonal weight of ``diagonal`` weighting, in [0, 1].
        row_normalization: ``sum`` (paper: rows sum to 1) or ``mean`` (rows average 1).
        diagonal_form: ``equations`` (the paper's Eq. 13-14: weights inside the sigmoid) or
            ``released`` (its code: weights outside; diagonal weighting, rows summing to 1).

    Returns:
        0-dim float32 (float64 for float64 inputs) loss; 0 when M or N is 0.

    Raises:
        ValueError: on any input that :func:`contrast_weights` rejects, non-1-D log-ratios,
            beta <= 0, or ``released`` with other weights.
    """
    check_logratios(chosen_logratios, rejected_logratios)
    _check_beta(beta)
    outside = _weights_outside(weighting, diagonal_form, row_normalization)
    dtype = compute_dtype(chosen_logratios, rejected_logratios, chosen_prompt_emb, rejected_prompt_emb)
    weights = contrast_weights(
        chosen_prompt_emb,
        rejected_prompt_emb,
        chosen_logratios.shape[0],
        rejected_logratios.shape[0],
        weighting=weighting,
        tau=tau,
        alpha=alpha,
        row_normalization=row_normalization,
        dtype=dtype,
        device=chosen_logratios.device,
    )
    if weights.numel() == 0:
        return _empty_loss(chosen_logratios, rejected_logratios)
    return _contrast_loss(beta * chosen_logratios.to(dtype), beta * rejected_logratios.to(dtype), weights,
                          weights_outside=outside)


def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float = 0.1) -> torch.Tensor:
    """Direct Preference Optimization: ``-(1/M) sum_i log sigmoid(beta * (delta_c_i - delta_r_i))``.

    Args:
        chosen_logratios: [M] policy minus reference log-prob of each chosen sequence.
        rejected_logratios: [M] the same for the rejected sequence of the same prompt.
        beta: inverse temperature, > 0.
    """
    check_logratios(chosen_logratios, rejected_logratios)
    _check_paired(chosen_logratios, rejected_logratios, "dpo_loss")
    _check_beta(beta)
    if chosen_logratios.numel() == 0:
        return _empty_loss(chosen_logratios, rejected_logratios)
    dtype = compute_dtype(chosen_logratios, rejected_logratios)
    return -F.logsigmoid(beta * (chosen_logratios.to(dtype) - rejected_logratios.to(dtype))).mean()


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, *, beta: float = 0.1,
             chosen_lengths: torch.Tensor | None = None, rejected_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Identity Preference Optimization: ``(1/M) sum_i ((delta_c_i - delta_r_i) - 1/(2 beta))^2``.

    Args:
        chosen_logratios: [M] policy minus reference log-prob of each chosen sequence.
        rejected_logratios: [M] the same for the rejected sequence of the same prompt.
        beta: regularisation strength, > 0 (the target margin is ``1 / (2 beta)``).
        chosen_lengths, rejected_lengths: [M] response lengths: given, each log-ratio is divided
            by its length first (TRL's IPO, on per-token average log-probs); omitted, the sums
            are used as in the IPO paper's and the RPO paper's code.
    """
    check_logratios(chosen_logratios, rejected_logratios)
    _check_paired(chosen_logratios, rejected_logratios, "ipo_loss")
    _check_beta(beta)
    if chosen_logratios.numel() == 0:
        return _empty_loss(chosen_logratios, rejected_logratios)
    dtype = compute_dtype(chosen_logratios, rejected_logratios)
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("ipo_loss: give both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        chosen_logratios = simpo_rewards(chosen_logratios, chosen_lengths, beta=1.0)
        rejected_logratios = simpo_rewards(rejected_logratios, rejected_lengths, beta=1.0)
    margin = chosen_logratios.to(dtype) - rejected_logratios.to(dtype)
    return ((margin - 1.0 / (2.0 * beta)) ** 2).mean()


def simpo_rewards(policy_logps: torch.Tensor, lengths: torch.Tensor, *, beta: float) -> torch.Tensor:
    """SimPO's reference-free reward ``beta / |y| * policy_logp`` per sequence.

    Args:
        policy_logps: [K] summed response-token log-probs.
        lengths: [K] response token counts, all > 0.
        beta: reward scale, > 0.
    """
    if lengths.shape != policy_logps.shape:
        raise ValueError(
            f"lengths must match policy_logps in shape, got {tuple(lengths.shape)} and {tuple(policy_logps.shape)}"
        )
    if (lengths <= 0).any():
        bad = (lengths <= 0).nonzero().flatten().tolist()
        raise ValueError(f"response lengths must be > 0, got {lengths[bad].tolist()} at positions {bad[:10]}")
    dtype = compute_dtype(policy_logps)
    return beta * policy_logps.to(dtype) / lengths.to(dtype)


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> torch.Tensor:
    """SimPO: ``-(1/M) sum_i log sigmoid(r_c_i - r_r_i - gamma)``, ``r = beta / |y| * policy_logp``.

    Args:
        chosen_logps: [M] policy log-probs (summed over response tokens) of the chosen sequences.
        rejected_logps: [M] the same for the rejected sequence of the same prompt.
        chosen_lengths: [M] response token counts of the chosen sequences.
        rejected_lengths: [M] response token counts of the rejected sequences.
        beta: reward scale, > 0.
        gamma: target reward margin.
    """
    check_logratios(chosen_logps, rejected_logps, ("chosen_logps", "rejected_logps"))
    _check_paired(chosen_logps, rejected_logps, "simpo_loss")
    _check_beta(beta)
    rc = simpo_rewards(chosen_logps, chosen_lengths, beta=beta)
    rr = simpo_rewards(rejected_logps, rejected_lengths, beta=beta)
    if rc.numel() == 0:
        return _empty_loss(chosen_logps, rejected_logps)
    return -F.logsigmoid(rc - rr - gamma).mean()


def simpo_rpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    chosen_prompt_emb: torch.Tensor | None = None,
    rejected_prompt_emb: torch.Tensor | None = None,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    weighting: str = "embedding",
    tau: float = 0.5,
    alpha: float = 0.8,
    row_normalization: str = "sum",
    diagonal_form: str = "equations",
) -> torch.Tensor:
    """SimPO + RPO: ``-(1/(M N)) sum_ij log sigmoid(w_ij * (r_c_i - r_r_j - gamma))``.

    The contrast matrix of :func:`rpo_loss` over SimPO's reference-free rewards
    ``r = beta / |y| * policy_logp`` (appendix B of the ICLR version of the RPO paper).
    Arguments are those of :func:`simpo_loss` and :func:`rpo_loss`; M and N may differ.
    """
    check_logratios(chosen_logps, rejected_logps, ("chosen_logps", "rejected_logps"))
    _check_beta(beta)
    outside = _weights_outside(weighting, diagonal_form, row_normalization)
    rc = simpo_rewards(chosen_logps, chosen_lengths, beta=beta)
    rr = simpo_rewards(rejected_logps, rejected_lengths, beta=beta)
    weights = contrast_weights(
        chosen_prompt_emb,
        rejected_prompt_emb,
        rc.shape[0],
        rr.shape[0],
        weighting=weighting,
        tau=tau,
        alpha=alpha,
        row_normalization=row_normalization,
        dtype=compute_dtype(rc, chosen_prompt_emb, rejected_prompt_emb),
        device=rc.device,
    )
    if weights.numel() == 0:
        return _empty_loss(chosen_logps, rejected_logps)
    return _contrast_loss(rc.to(weights.dtype), rr.to(weights.dtype), weights, gamma, weights_outside=outside)


def kto_reference_point(mismatched_logratios: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0``: the policy's KL from the reference, estimated as the paper does.

    ``z0 = max(0, mean_k (policy_logp - ref_logp))`` over completions scored after a prompt they
    do not answer (each item's prompt with another item's completion), detached: no gradient
    flows through it. 0 when there is no mismatched pair.

    Args:
        mismatched_logratios: [K] policy minus reference log-prob of each mismatched pair.
    """
    if mismatched_logratios.dim() != 1:
        raise ValueError(f"mismatched_logratios must be 1-D [K], got shape {tuple(mismatched_logratios.shape)}")
    x = mismatched_logratios.detach().to(compute_dtype(mismatched_logratios))
    if x.numel() == 0:
        return x.new_zeros(())
    return x.mean().clamp(min=0.0)


def kto_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    mismatched_logratios: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Kahneman-Tversky Optimization over unpaired items (the paper's Eq. 8, as TRL computes it).

    ``L = (sum_i lambda_D (1 - sigmoid(beta (delta_c_i - z0))) + sum_j lambda_U (1 - sigmoid(beta (z0 - delta_r_j))))
    / (M + N)``, ``z0`` from :func:`kto_reference_point`.

    Args:
        chosen_logratios: [M] policy minus reference log-prob of each desirable item.
        rejected_logratios: [N] the same for each undesirable item.
        mismatched_logratios: [K] the same for each mismatched (prompt, completion) pair.
        beta: inverse temperature, > 0.
        desirable_weight, undesirable_weight: lambda_D and lambda_U, > 0 (the paper advises
            ``lambda_D M / (lambda_U N)`` in [1, 4/3]).
    """
    check_logratios(chosen_logratios, rejected_logratios)
    _check_beta(beta)
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ValueError(f"KTO weights must be > 0, got desirable {desirable_weight} and "
                         f"undesirable {undesirable_weight}")
    dtype = compute_dtype(chosen_logratios, rejected_logratios)
    count = chosen_logratios.numel() + rejected_logratios.numel()
    if count == 0:
        return _empty_loss(chosen_logratios, rejected_logratios)
    z0 = kto_reference_point(mismatched_logratios).to(dtype)
    desirable = 1.0 - torch.sigmoid(beta * (chosen_logratios.to(dtype) - z0))
    undesirable = 1.0 - torch.sigmoid(beta * (z0 - rejected_logratios.to(dtype)))
    return (desirable_weight * desirable.sum() + undesirable_weight * undesirable.sum()) / count
