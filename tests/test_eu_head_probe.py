"""`benchmarks.eu_head_probe`: the grouped cross-validation sees what an input adds, and only that."""

import numpy as np

from benchmarks.eu_head_probe import _spearman_cv


def test_an_informative_input_raises_the_cross_validated_spearman():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 10)  # 60 "answers" of 10 tokens
    signal, noise = rng.normal(size=600), rng.normal(size=600)
    truth = np.exp(0.5 * signal + 0.1 * rng.normal(size=600))
    without = _spearman_cv(noise[:, None], truth, groups)
    with_it = _spearman_cv(np.stack([noise, signal], 1), truth, groups)
    assert abs(without) < 0.2 and with_it > 0.9
