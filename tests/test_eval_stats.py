"""Win-rates, means, bootstrap CIs and sign tests on hand-made score tables with known answers."""

import numpy as np
import pandas as pd
import pytest

from eval.stats import Bootstrap, bootstrap_ratio_ci, mean_table, sign_test, win_table

BOOT = Bootstrap(samples=500, confidence=0.95, seed=0)


def table(base: dict, ft: dict, prompt_set: str = "s", metric: str = "m") -> pd.DataFrame:
    """Rows of a baseline and a fine-tuned model: {prompt_id: [score of image 0, image 1, ...]}."""
    rows = []
    for model, scores in (("base", base), ("ft", ft)):
        for prompt_id, values in scores.items():
            rows += [{"model": model, "prompt_set": prompt_set, "prompt_id": prompt_id, "index": k, metric: v} for k, v in enumerate(values)]
    return pd.DataFrame(rows)


# p1: ft wins both images and the prompt; p2: tie + loss, prompt lost; p3: win + loss, prompt means tie
HAND = table({"p1": [1.0, 2.0], "p2": [1.0, 1.0], "p3": [0.0, 2.0]}, {"p1": [2.0, 3.0], "p2": [1.0, 0.0], "p3": [1.0, 1.0]})


def row(wins: pd.DataFrame, unit: str) -> pd.Series:
    selected = wins[wins.unit == unit]
    assert len(selected) == 1
    return selected.iloc[0]


def test_per_image_wins_ties_and_losses_are_counted_separately():
    r = row(win_table(HAND, "base", ["ft"], ["m"], BOOT), "image")
    assert (r.n, r.wins, r.ties, r.losses) == (6, 3, 1, 2)
    assert (r.win_rate, r.tie_rate, r.loss_rate) == pytest.approx((3 / 6, 1 / 6, 2 / 6))
    assert r.mean_diff == pytest.approx(1 / 6) and r.prompts == 3


def test_per_prompt_compares_prompt_means():
    r = row(win_table(HAND, "base", ["ft"], ["m"], BOOT), "prompt")
    assert (r.n, r.wins, r.ties, r.losses) == (3, 1, 1, 1)
    assert r.win_rate == pytest.approx(1 / 3) and r.mean_diff == pytest.approx((1.0 - 0.5 + 0.0) / 3)


def test_prompt_means_equal_up_to_rounding_are_a_tie():
    # (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1 in floating point, yet the prompt means are equal
    wins = win_table(table({"p": [0.1, 0.2, 0.3]}, {"p": [0.3, 0.2, 0.1]}), "base", ["ft"], ["m"], BOOT)
    assert tuple(row(wins, "prompt")[["wins", "ties", "losses"]]) == (0, 1, 0)
    assert tuple(row(wins, "image")[["wins", "ties", "losses"]]) == (1, 1, 1)


@pytest.mark.parametrize("wins, losses, expected", [(0, 0, 1.0), (1, 1, 1.0), (3, 1, 10 / 16), (5, 0, 2 / 32), (0, 5, 2 / 32), (8, 2, 2 * 56 / 1024), (10, 0, 2 / 1024)])
def test_sign_test_exact_two_sided(wins, losses, expected):
    assert sign_test(wins, losses) == pytest.approx(expected, rel=1e-12)


def test_sign_test_matches_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    for wins, losses in [(7, 3), (12, 30), (250, 200), (1000, 1100)]:
        assert sign_test(wins, losses) == pytest.approx(stats.binomtest(wins, wins + losses, 0.5).pvalue, rel=1e-9)


def test_sign_test_ignores_ties():
    r = row(win_table(HAND, "base", ["ft"], ["m"], BOOT), "image")
    assert r.p_value == pytest.approx(sign_test(3, 2)) == pytest.approx(1.0)


def test_single_prompt_gives_a_zero_width_interval_at_the_estimate():
    one = table({"p": [1.0, 2.0, 3.0]}, {"p": [2.0, 1.0, 4.0]})
    wins = win_table(one, "base", ["ft"], ["m"], BOOT)
    for unit, rate in (("image", 2 / 3), ("prompt", 1.0)):
        r = row(wins, unit)
        assert (r.win_rate, r.ci_low, r.ci_high) == pytest.approx((rate, rate, rate))
        assert r.diff_ci_low == pytest.approx(r.mean_diff) and r.diff_ci_high == pytest.approx(r.mean_diff)
    means = mean_table(one, ["m"], BOOT).set_index("model")
    assert (means.loc["ft", "mean"], means.loc["ft", "ci_low"], means.loc["ft", "ci_high"]) == pytest.approx((7 / 3,) * 3)


def test_all_wins_give_interval_at_one_and_small_p():
    sweep = table({f"p{i}": [0.0, 0.0] for i in range(6)}, {f"p{i}": [1.0, 2.0] for i in range(6)})
    r = row(win_table(sweep, "base", ["ft"], ["m"], BOOT), "image")
    assert (r.win_rate, r.ci_low, r.ci_high) == (1.0, 1.0, 1.0)
    assert r.p_value == pytest.approx(2 / 2**12)


def test_bootstrap_interval_matches_the_normal_approximation():
    # 400 prompts, one pair each, half won: the 95% CI of the win rate is about 0.5 +- 1.96 * 0.025
    n = 400
    half = table({f"p{i}": [0.0] for i in range(n)}, {f"p{i}": [1.0 if i % 2 else -1.0] for i in range(n)})
    r = row(win_table(half, "base", ["ft"], ["m"], Bootstrap(samples=4000, seed=1)), "image")
    assert r.win_rate == 0.5
    assert r.ci_low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.01) and r.ci_high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.01)


def test_bootstrap_resamples_prompts_not_images():
    # each prompt is all-win or all-loss: resampling 4 prompts gives a wide interval even with 40 images per prompt
    clustered = table({f"p{i}": [0.0] * 40 for i in range(4)}, {f"p{i}": [1.0 if i < 2 else -1.0] * 40 for i in range(4)})
    r = row(win_table(clustered, "base", ["ft"], ["m"], BOOT), "image")
    assert r.win_rate == 0.5 and r.ci_low <= 0.25 and r.ci_high >= 0.75


def test_ratio_ci_is_seeded_and_vectorised():
    rng_numer = np.random.default_rng(0).normal(size=(30, 3))
    denom = np.ones((30, 3))
    a = bootstrap_ratio_ci(rng_numer, denom, BOOT, np.random.default_rng(5))
    b = bootstrap_ratio_ci(rng_numer, denom, BOOT, np.random.default_rng(5))
    c = bootstrap_ratio_ci(rng_numer[:, 1], denom[:, 1], BOOT, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    assert c[0] == pytest.approx(a[0][1]) and c[1] == pytest.approx(a[1][1])
    assert np.all(a[0] < rng_numer.mean(axis=0)) and np.all(rng_numer.mean(axis=0) < a[1])


def test_adding_a_model_does_not_change_another_models_interval():
    three = pd.concat([HAND, HAND[HAND.model == "ft"].assign(model="ft2", m=lambda d: d.m * 0.5)], ignore_index=True)
    alone = win_table(HAND, "base", ["ft"], ["m"], BOOT)
    together = win_table(three, "base", ["ft", "ft2"], ["m"], BOOT)
    # exact: the scores are halves and integers, so every sum is exact in any order
    pd.testing.assert_frame_equal(alone, together[together.model == "ft"].reset_index(drop=True))


def test_means_per_model_prompt_set_and_metric():
    two_sets = pd.concat([HAND, table({"q": [4.0]}, {"q": [5.0]}, prompt_set="t")], ignore_index=True)
    two_sets["n"] = -two_sets["m"]
    means = mean_table(two_sets, ["m", "n"], BOOT).set_index(["model", "prompt_set", "metric"])
    assert means.loc[("base", "s", "m"), "mean"] == pytest.approx(7 / 6)
    assert means.loc[("ft", "s", "m"), "mean"] == pytest.approx(8 / 6)
    assert means.loc[("ft", "s", "n"), "mean"] == pytest.approx(-8 / 6)
    assert means.loc[("ft", "t", "m"), "mean"] == 5.0
    assert tuple(means.loc[("base", "s", "m"), ["images", "prompts", "missing"]]) == (6, 3, 0)
    s = means.xs("s", level="prompt_set")
    assert (s.ci_low <= s["mean"]).all() and (s["mean"] <= s.ci_high).all() and (s.ci_low < s.ci_high).all()


def test_unscored_images_drop_out_of_their_pair_and_are_counted():
    holed = HAND.copy()
    holed.loc[(holed.model == "ft") & (holed.prompt_id == "p1") & (holed["index"] == 0), "m"] = np.nan
    r = row(win_table(holed, "base", ["ft"], ["m"], BOOT), "image")
    assert (r.n, r.wins, r.ties, r.losses) == (5, 2, 1, 2)
    means = mean_table(holed, ["m"], BOOT).set_index("model")
    assert (means.loc["ft", "images"], means.loc["ft", "missing"], means.loc["ft", "mean"]) == (5, 1, pytest.approx(6 / 5))
