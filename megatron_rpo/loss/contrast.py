"""Contrast weights of the RPO matrix (pure math, no torch.distributed).

Rows are chosen sequences i = 1..M, columns rejected sequences j = 1..N.

* ``embedding`` (default): ``w_ij = softmax_j(-(1 - cos(e_i, e_j)) / tau)``, each row sums
  to 1 and prompts that are alike weigh more. (The paper's Eq. 10 and its Algorithm 1 write
  ``exp(-cos/tau)``; only its released code and Listing 1 use the cosine distance ``1 - cos``,
  which is what makes similar prompts weigh more, and what is used here.)
* ``uniform``: ``w_ij = 1 / N``.
* ``diagonal`` (paired data, M == N): ``w_ii = alpha``, ``w_ij = (1 - alpha) / (M - 1)``
  for i != j; a 1 x 1 matrix has the single weight 1 (its row must sum to 1).

``row_normalization="mean"`` multiplies every weight by N so that the mean weight in a
row is 1 instead of the row summing to 1: with row-sum-one weights each cell is scaled
by about 1/N, which silently shrinks the effective beta as the matrix grows (the point of
gathering it across ranks). ``"sum"`` is the paper's normalisation and the default.

Weights are computed in float64 for float64 inputs and in float32 otherwise (the paper's
code computes them in bf16, which rounds a softmax over 64 columns visibly).
"""

from __future__ import annotations

import torch

__all__ = [
    "WEIGHTINGS",
    "ROW_NORMALIZATIONS",
    "compute_dtype",
    "contrast_weights",
    "row_entropy",
    "check_logratios",
]

WEIGHTINGS = ("embedding", "uniform", "diagonal")
ROW_NORMALIZATIONS = ("sum", "mean")


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (never bf16/fp16)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def check_logratios(chosen: torch.Tensor, rejected: torch.Tensor, names=("chosen_logratios", "rejected_logratios")):
    """Raise ValueError unless both are 1-D floating tensors."""
    for name, t in zip(names, (chosen, rejected)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D tensor [M] or [N], got shape {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_embeddings(emb: torch.Tensor | None, rows: int, name: str) -> torch.Tensor:
    if emb is None:
        raise ValueError(f'weighting="embedding" needs {name} ([{rows}, D] prompt embeddings), got None')
    if emb.dim() != 2 or emb.shape[0] != rows:
        raise ValueError(f"{name} must have shape [{rows}, D] to match its log-ratios, got {tuple(emb.shape)}")
    if not torch.isfinite(emb).all():
        bad = (~torch.isfinite(emb)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"{name} has NaN or inf values in rows {bad[:10]}")
    norms = emb.norm(dim=1)
    if (norms == 0).any():
        bad = (norms == 0).nonzero().flatten().tolist()
        raise ValueError(f"{name} has zero-norm rows {bad[:10]}; a prompt embedding must be non-zero")
    return emb


def contrast_weights(
    chosen_prompt_emb: torch.Tensor | None,
    rejected_prompt_emb: torch.Tensor | None,
    num_chosen: int,
    num_rejected: int,
    *,
    weighting: str = "embedding",
    tau: float = 0.5,
    alpha: float = 0.8,
    row_normalization: str = "sum",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The [M, N] contrast weights (see the module docstring for the formulas).

    Args:
        chosen_prompt_emb: [M, D] prompt embeddings of the chosen rows (``embedding`` only).
        rejected_prompt_emb: [N, D] prompt embeddings of the rejected columns (``embedding`` only).
        num_chosen: M.
        num_rejected: N.
        weighting: ``embedding``, ``uniform`` or ``diagonal``.
        tau: softmax temperature of ``embedding`` weights, > 0.
        alpha: diagonal weight of ``diagonal`` weights, in [0, 1].
        row_normalization: ``sum`` (rows sum to 1) or ``mean`` (rows average 1).
        dtype: float32 or float64; the weights are computed in it.
        device: where ``uniform`` and ``diagonal`` weights are made; pass the device of the
            log-ratios they will multiply (``embedding`` weights follow the embeddings).

    Returns:
        [M, N] tensor of ``dtype``. Empty when M or N is 0.

    Raises:
        ValueError: bad weighting, tau, alpha or normalisation; embeddings missing, of the
            wrong shape, NaN/inf or zero-norm; ``diagonal`` with M != N.
    """
    M, N = num_chosen, num_rejected
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if row_normalization not in ROW_NORMALIZATIONS:
        raise ValueError(f"row_normalization must be one of {ROW_NORMALIZATIONS}, got {row_normalization!r}")
    if weighting == "embedding":
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        ce = _check_embeddings(chosen_prompt_emb, M, "chosen_prompt_emb")
        re = _check_embeddings(rejected_prompt_emb, N, "rejected_prompt_emb")
        if ce.shape[1] != re.shape[1]:
            raise ValueError(
                f"chosen_prompt_emb and rejected_prompt_emb differ in dimension: {tuple(ce.shape)} vs {tuple(re.shape)}"
            )
        device = ce.device
    elif weighting == "diagonal":
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if M != N:
            raise ValueError(f'weighting="diagonal" needs paired data (M == N), got M={M}, N={N}')
    if M == 0 or N == 0:
        return torch.zeros(M, N, dtype=dtype, device=device)

    if weighting == "embedding":
        ce = torch.nn.functional.normalize(chosen_prompt_emb.to(dtype), dim=1)
        re = torch.nn.functional.normalize(rejected_prompt_emb.to(dtype), dim=1)
        cos = ce @ re.T  # [M, D] x [D, N] -> [M, N]
        weights = torch.softmax(-(1.0 - cos) / tau, dim=1)
    elif weighting == "uniform":
        weights = torch.full((M, N), 1.0 / N, dtype=dtype, device=device)
    else:
        off = (1.0 - alpha) / (M - 1) if M > 1 else 0.0
        diag = alpha if M > 1 else 1.0
        weights = torch.full((M, N), off, dtype=dtype, device=device)
        weights.fill_diagonal_(diag)
    if row_normalization == "mean":
        weights = weights * N
    return weights


def row_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the Shannon entropy (nats) of each row's weight distribution.

    Rows are renormalised to sum to 1 first, so ``mean`` normalisation gives the same value.
    ``log N`` means uniform rows; 0 means all weight on one column. 0 for an empty matrix.
    """
    if weights.numel() == 0:
        return weights.new_zeros(())
    p = weights / weights.sum(dim=1, keepdim=True)
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim=1).mean()

