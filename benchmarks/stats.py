"""Statistics over seeds: mean ± SD, paired per-seed differences and the verdict on them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable

# a per-seed difference below this is rounding (e.g. an ensemble of identical draws), not a difference
TIE = 1e-7


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample SD (NaN for a single value).

    Args:
        values: one number per seed.
    """
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def fmt(values: list[float]) -> str:
    """'mean ± SD' with 4 decimals (the mean alone for one value).

    Args:
        values: one number per seed.
    """
    m, s = mean_sd(values)
    return f"{m:.4f} ± {s:.4f}" if not math.isnan(s) else f"{m:.4f}"


def paired(runs: list[dict], a_get: Callable[[dict], float], b_get: Callable[[dict], float]) -> dict[str, float]:
    """a − b per seed: mean, SD, and how many seeds have a < b (lower is better for every metric used).

    Args:
        runs: one record per seed.
        a_get: a run -> a's metric.
        b_get: a run -> b's metric.
    """
    d = [a_get(r) - b_get(r) for r in runs]
    m, s = mean_sd(d)
    return {"mean": m, "sd": s, "n": len(d), "lower_in": sum(x < -TIE for x in d)}


def beyond_noise(p: dict[str, float]) -> bool:
    """The per-seed difference has the same sign in every seed and |mean| > 2 SE.

    Args:
        p: a `paired` result.
    """
    se = p["sd"] / math.sqrt(p["n"]) if p["n"] > 1 else float("inf")
    return abs(p["mean"]) > max(2 * se, TIE) and p["lower_in"] in (0, p["n"])


def paired_verdict(p: dict[str, float], metric: str, what: str, than: str) -> str:
    """One sentence: `what` is better than / worse than / no different from `than`, with the numbers.

    Args:
        p: a `paired` result of what − than.
        metric: the metric's name, as printed.
        what: the compared row.
        than: the reference row.
    """
    if beyond_noise(p):
        word = "better than" if p["mean"] < 0 else "worse than"
    else:
        word = "no different (within noise) from"
    return (
        f"{what} is {word} {than}: Δ{metric} = {p['mean']:+.4f} ± {p['sd']:.4f} "
        f"(SD over {p['n']} seeds; lower in {p['lower_in']}/{p['n']})"
    )


def calibration_rule(ks: Iterable[float | None]) -> str:
    """How calibration kept delta_scale, from the records' `min_gain_se` values ("" when a record lacks it)."""
    ks = set(ks)
    if not ks or None in ks:
        return ""
    if len(ks) > 1:
        return f"the runs used different calibration rules (min_gain_se {sorted(ks)}): rerun them with --force"
    return f"the best grid value kept only when its validation gain was ≥ {ks.pop():g} standard errors"
