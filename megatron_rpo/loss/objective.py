"""One entry point from per-sequence log-probs to the configured preference loss and its metrics.

``preference_loss(config, chosen, rejected)`` dispatches on ``config.loss_type`` through a table
(no string if/elif), computes the rewards the loss works on, and reports the metrics of
:func:`~megatron_rpo.loss.metrics.preference_metrics`. Pure math: the distributed all-gather
lives elsewhere and calls this on the gathered tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_rpo.config import LossConfig
from megatron_rpo.loss.contrast import contrast_weights
from megatron_rpo.loss.losses import (
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    rpo_loss,
    simpo_loss,
    simpo_rewards,
    simpo_rpo_loss,
)
from megatron_rpo.loss.metrics import preference_metrics

__all__ = ["Sequences", "sequence_rows", "sides_from_batch", "mismatched_from_batch", "preference_loss", "LOSS_TYPES"]


@dataclass
class Sequences:
    """One side of the matrix (the chosen rows or the rejected columns)."""

    policy_logps: torch.Tensor
    """[K] policy log-prob summed over response tokens."""
    lengths: torch.Tensor
    """[K] response token counts."""
    ref_logps: torch.Tensor | None = None
    """[K] reference log-probs (reference-based losses)."""
    prompt_emb: torch.Tensor | None = None
    """[K, D] prompt embeddings (``weighting: embedding``)."""

    def logratios(self) -> torch.Tensor:
        if self.ref_logps is None:
            raise ValueError("this loss needs reference log-probs (batch key 'ref_logps'), got none")
        if self.ref_logps.shape != self.policy_logps.shape:
            raise ValueError(
                f"ref_logps shape {tuple(self.ref_logps.shape)} does not match policy_logps "
                f"{tuple(self.policy_logps.shape)}"
            )
        return self.policy_logps - self.ref_logps.to(self.policy_logps.dtype)


def sequence_rows(batch: dict, policy_logps: torch.Tensor, lengths: torch.Tensor) -> dict:
    """The per-sequence rows of a microbatch that the loss reads (what crosses data-parallel ranks)."""
    return {
        "policy_logps": policy_logps,
        "lengths": lengths,
        "is_chosen": batch["is_chosen"],
        "is_mismatched": batch.get("is_mismatched"),
        "ref_logps": batch.get("ref_logps"),
        "prompt_embedding": batch.get("prompt_embedding"),
    }


def sides_from_batch(batch: dict, policy_logps: torch.Tensor, lengths: torch.Tensor) -> tuple[Sequences, Sequences]:
    """Chosen rows and rejected columns of a microbatch (batch contract keys), in batch order.

    Paired microbatches hold the chosen rows first and the rejected second, in the same pair
    order, so chosen i and rejected i share a prompt. Mismatched pairs (KTO's, ``is_mismatched``)
    are on neither side: :func:`mismatched_from_batch`.
    """
    is_chosen = batch["is_chosen"].bool()
    scored = _scored(batch)
    ref, emb = batch.get("ref_logps"), batch.get("prompt_embedding")

    def side(mask):
        return Sequences(
            policy_logps=policy_logps[mask],
            lengths=lengths[mask],
            ref_logps=None if ref is None else ref[mask],
            prompt_emb=None if emb is None else emb[mask],
        )

    return side(is_chosen & scored), side(~is_chosen & scored)


def _scored(batch: dict) -> torch.Tensor:
    mismatched = batch.get("is_mismatched")
    return torch.ones_like(batch["is_chosen"], dtype=torch.bool) if mismatched is None else ~mismatched.bool()


def mismatched_from_batch(batch: dict, policy_logps: torch.Tensor, lengths: torch.Tensor) -> Sequences | None:
    """The mismatched (prompt, completion) pairs of a microbatch (KTO's reference point), or None."""
    if batch.get("is_mismatched") is None:
        return None
    mask = ~_scored(batch)
    ref = batch.get("ref_logps")
    return Sequences(policy_logps=policy_logps[mask], lengths=lengths[mask],
                     ref_logps=None if ref is None else ref[mask])


def _weighting_kwargs(c: LossConfig) -> dict:
    return dict(weighting=c.weighting, tau=c.tau, alpha=c.alpha, row_normalization=c.row_normalization)


def _loss_kwargs(c: LossConfig) -> dict:
    return dict(_weighting_kwargs(c), diagonal_form=c.diagonal_form)


def _rpo(c: LossConfig, chosen: Sequences, rejected: Sequences, mismatched: Sequences | None):
    lc, lr = chosen.logratios(), rejected.logratios()
    loss = rpo_loss(lc, lr, chosen.prompt_emb, rejected.prompt_emb, beta=c.beta, **_loss_kwargs(c))
    return loss, c.beta * lc, c.beta * lr


def _dpo(c: LossConfig, chosen: Sequences, rejected: Sequences, mismatched: Sequences | None):
    lc, lr = chosen.logratios(), rejected.logratios()
    return dpo_loss(lc, lr, beta=c.beta), c.beta * lc, c.beta * lr


def _ipo(c: LossConfig, chosen: Sequences, rejected: Sequences, mismatched: Sequences | None):
    lc, lr = chosen.logratios(), rejected.logratios()
    lengths = dict(chosen_lengths=chosen.lengths, rejected_lengths=rejected.lengths) if c.ipo_length_normalized else {}
    return ipo_loss(lc, lr, beta=c.beta, **lengths), c.beta * lc, c.beta * lr


def _simpo(c: LossConfig, chosen: Sequences, rejected: Sequences, mismatched: Sequences | None):
    loss = simpo_loss(chosen.policy_logps, rejected.policy_logps, chosen.lengths, rejected.lengths,
                      beta=c.beta, gamma=c.gamma)
    rc = simpo_rewards(chosen.policy_logps, chosen.lengths, beta=c.beta)
    rr = simpo_rewards(rejected.policy_logps, rejected.lengths, beta=c.beta)
    return loss, rc, rr


def _simpo_rpo(c: LossConfig, chosen: Sequences, rejected: Sequences, mismatched: Sequences | None):
    loss = simpo_rpo_loss(chosen.policy_logps, rejected.policy_logps, chosen.lengths, rejected.lengths,
                          chosen.prompt_emb, rejected.prompt_emb, beta=c.beta, gamma=c.gamma, **_loss_kwargs(c))
    rc = simpo_rewards(chosen.policy_logps, chosen.lengths, beta=c.beta)
    rr = simpo_rewards(rejected.policy_logps, rejected.lengths, beta=c.beta)
    return loss, rc, rr


def _sft(c: LossConfig, chosen: Sequences, rejected: Sequences, mismatched: Sequences | None):
    # Supervised warm-up: negative log-likelihood per response token of the chosen sequences,
    # averaged over tokens. Rewards: per-token log-probs, so accuracy says which response the
    # model finds likelier.
    lengths = chosen.lengths.to(chosen.policy_logps.dtype)
    if chosen.policy_logps.numel() == 0:
        loss = chosen.policy_logps.sum() * 0.0
    else:
        loss = -chosen.policy_logps.sum() / lengths.sum()
    rr = rejected.policy_logps / rejected.lengths.to(rejected.policy_logps.dtype)
    return loss, chosen.policy_logps / lengths, rr


def _kto(c: LossConfig, chosen: Sequences, rejected: Sequences, mismatched: Sequences | None):
    if mismatched is None:
        raise ValueError("loss_type kto needs the microbatch's mismatched pairs (batch key 'is_mismatched'), got none")
    lc, lr = chosen.logratios(), rejected.logratios()
    loss = kto_loss(lc, lr, mismatched.logratios(), beta=c.beta, desirable_weight=c.kto_desirable_weight,
                    undesirable_weight=c.kto_undesirable_weight)
    return loss, c.beta * lc, c.beta * lr


LOSS_TYPES: dict[str, Callable] = {"rpo": _rpo, "dpo": _dpo, "ipo": _ipo, "simpo": _simpo, "simpo_rpo": _simpo_rpo,
                                   "kto": _kto, "sft": _sft}
"""loss_type -> fn(config, chosen, rejected, mismatched) -> (loss, chosen_rewards, rejected_rewards)."""


def preference_loss(
    config: LossConfig, chosen: Sequences, rejected: Sequences, *, paired: bool, mismatched: Sequences | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured loss over chosen rows and rejected columns, and its metrics.

    ``paired``: chosen i and rejected i share a prompt (see :func:`preference_metrics`).
    ``mismatched``: KTO's mismatched pairs; their estimate of the KL (the reference point
    ``z0``) is reported as ``kl``.

    Returns:
        (0-dim loss, metrics): rewards are ``beta * (policy - reference)`` for reference-based
        losses and SimPO's ``beta / |y| * policy_logp`` for reference-free ones.
    """
    loss, chosen_rewards, rejected_rewards = LOSS_TYPES[config.loss_type](config, chosen, rejected, mismatched)
    weights = None
    if config.uses_matrix:
        with torch.no_grad():
            weights = contrast_weights(
                chosen.prompt_emb, rejected.prompt_emb, chosen_rewards.shape[0], rejected_rewards.shape[0],
                **_weighting_kwargs(config), device=chosen_rewards.device,
            )
    metrics = preference_metrics(chosen_rewards, rejected_rewards, weights, paired=paired,
                                 chosen_logps=chosen.policy_logps, rejected_logps=rejected.policy_logps)
    if mismatched is not None and mismatched.ref_logps is not None:
        metrics["kl"] = kto_reference_point(mismatched.logratios()).float()
    return loss, metrics
