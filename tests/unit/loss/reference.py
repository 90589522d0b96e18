"""An independent float64 transcription of DESIGN section 2, in plain Python loops.

Nothing here calls torch: it is what the package's loss is checked against.
"""

import math


def log_sigmoid(x: float) -> float:
    # log(1 / (1 + e^-x)), stable for large |x|.
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def cosine(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def weights(chosen_emb, rejected_emb, M, N, weighting, tau, alpha, row_normalization):
    w = [[0.0] * N for _ in range(M)]
    for i in range(M):
        if weighting == "embedding":
            logits = [-(1.0 - cosine(chosen_emb[i], rejected_emb[j])) / tau for j in range(N)]
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            w[i] = [e / sum(exps) for e in exps]
        elif weighting == "uniform":
            w[i] = [1.0 / N] * N
        else:  # diagonal
            for j in range(N):
                w[i][j] = (1.0 if M == 1 else alpha) if i == j else (1.0 - alpha) / (M - 1)
        if row_normalization == "mean":
            w[i] = [v * N for v in w[i]]
    return w


def rpo(chosen, rejected, chosen_emb, rejected_emb, beta, weighting, tau, alpha, row_normalization):
    M, N = len(chosen), len(rejected)
    w = weights(chosen_emb, rejected_emb, M, N, weighting, tau, alpha, row_normalization)
    total = 0.0
    for i in range(M):
        for j in range(N):
            total += log_sigmoid(beta * w[i][j] * (chosen[i] - rejected[j]))
    return -total / (M * N)


def dpo(chosen, rejected, beta):
    return -sum(log_sigmoid(beta * (c - r)) for c, r in zip(chosen, rejected)) / len(chosen)


def ipo(chosen, rejected, beta):
    return sum(((c - r) - 1.0 / (2.0 * beta)) ** 2 for c, r in zip(chosen, rejected)) / len(chosen)


def simpo_rpo(chosen_logps, rejected_logps, chosen_len, rejected_len, chosen_emb, rejected_emb,
              beta, gamma, weighting, tau, alpha, row_normalization):
    rc = [beta * lp / n for lp, n in zip(chosen_logps, chosen_len)]
    rr = [beta * lp / n for lp, n in zip(rejected_logps, rejected_len)]
    M, N = len(rc), len(rr)
    w = weights(chosen_emb, rejected_emb, M, N, weighting, tau, alpha, row_normalization)
    total = sum(log_sigmoid(w[i][j] * (rc[i] - rr[j] - gamma)) for i in range(M) for j in range(N))
    return -total / (M * N)


def simpo(chosen_logps, rejected_logps, chosen_len, rejected_len, beta, gamma):
    terms = [
        log_sigmoid(beta * c / lc - beta * r / lr - gamma)
        for c, r, lc, lr in zip(chosen_logps, rejected_logps, chosen_len, rejected_len)
    ]
    return -sum(terms) / len(terms)


def rpo_diagonal_released(chosen, rejected, beta, alpha):
    """The paper's released RPODiagonalTrainer: weights outside the log-sigmoid (DPO for one pair)."""
    M = len(chosen)
    total = 0.0
    for i in range(M):
        own = -log_sigmoid(beta * (chosen[i] - rejected[i]))
        if M == 1:
            total += own
            continue
        others = [-log_sigmoid(beta * (chosen[i] - rejected[j])) for j in range(M) if j != i]
        total += alpha * own + (1.0 - alpha) * sum(others) / len(others)
    return total / M


def ipo_length_normalized(chosen, rejected, chosen_len, rejected_len, beta):
    """TRL's IPO: log-ratios averaged per response token."""
    margins = [c / lc - r / lr for c, r, lc, lr in zip(chosen, rejected, chosen_len, rejected_len)]
    return sum((m - 1.0 / (2.0 * beta)) ** 2 for m in margins) / len(margins)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def kto(desirable, undesirable, mismatched, beta, lambda_d, lambda_u):
    """KTO (Ethayarajh et al. 2024, Eq. 8): the mean over items of ``lambda_y - v(x, y)``, with
    ``v = lambda_D sigmoid(beta (r - z0))`` for a desirable item and ``lambda_U sigmoid(beta (z0 - r))``
    for an undesirable one, ``r`` the log-ratio and ``z0 = max(0, mean of the mismatched pairs' log-ratios)``
    (section 4.1's estimate)."""
    z0 = max(0.0, sum(mismatched) / len(mismatched)) if mismatched else 0.0
    values = [lambda_d - lambda_d * sigmoid(beta * (r - z0)) for r in desirable]
    values += [lambda_u - lambda_u * sigmoid(beta * (z0 - r)) for r in undesirable]
    return sum(values) / len(values)
