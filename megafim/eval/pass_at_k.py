"""The unbiased pass@k estimator of Chen et al. (2021), "Evaluating Large Language Models Trained
on Code": with n samples of which c pass, pass@k = 1 - C(n - c, k) / C(n, k), the probability that
at least one of k samples drawn without replacement from the n passes."""

from __future__ import annotations

from typing import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k for one task from n samples with c correct (requires 1 <= k <= n, 0 <= c <= n).

    The binomials overflow floats for large n, so the ratio is computed as a product:
    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    ratio = 1.0
    for i in range(n - c + 1, n + 1):
        ratio *= 1.0 - k / i
    return 1.0 - ratio


def mean_pass_at_k(counts: Sequence[tuple[int, int]], ks: Iterable[int]) -> dict[int, float]:
    """Mean pass@k over tasks given (n, c) per task, for each k with k <= n on every task (a k
    larger than some task's sample count is left out, as the estimate would be undefined)."""
    if not counts:
        raise ValueError("no tasks to score")
    min_n = min(n for n, _ in counts)
    result = {}
    for k in sorted(set(ks)):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k <= min_n:
            result[k] = sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
    return result
