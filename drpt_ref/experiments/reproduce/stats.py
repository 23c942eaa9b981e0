"""The statistics of `drpt reproduce`: rows over seeds, paired differences, choices on select, verdicts.

Every number a verdict rests on is computed here from the run summaries (run.py), so the prose of the
report (report.py) and of the notebooks cannot contradict the tables. Conventions:

    metric      "accuracy" (greedy exact match, higher is better) or "loss" (answer NLL, lower is better)
    split       "select" (used to choose: the best Dr method, the best baseline, the early-stopping step)
                or "report" (every reported number); disjoint halves of the held-out prompts
    SE          the standard error of a mean over seeds, std / sqrt(k) (sample std, k - 1 in it)
    paired      the difference of two rows seed by seed (the same seed draws the same data), then its mean
                and SE: the seed-to-seed spread that both rows share cancels
    verdict     "ahead" / "behind" when the paired difference is more than t SE in favour / against, t the
                97.5 % quantile of Student's t with k - 1 degrees of freedom (a two-sided 95 % paired t-test,
                eq. (2) in theory/reproduction.md: 2.78 SE at 5 seeds, 12.7 at 2; a flat 2 SE would call about
                29 % of true ties at 2 seeds), otherwise "tied within t SE"; "unsupported" below 2 common seeds

Shapes: no tensors here.
"""

from __future__ import annotations

import functools
import math
import statistics

from scipy.stats import t as student_t

from drpt_ref.experiments.reproduce.plan import BASELINES, DR_METHODS

VERDICT_LEVEL = 0.95  # two-sided level of the paired t-test behind every verdict (eq. (2) in theory/reproduction.md)
EARLY = "target (early-stopped)"  # the row read from the target-only runs at their best select step


def higher_is_better(metric: str) -> bool:
    return metric == "accuracy"


def kind_of(row: str) -> str:
    method = row.removesuffix("-pl")
    if row == EARLY or method in ("target", "mean", "oracle"):
        return "endpoint"
    return "dr" if method in DR_METHODS else "baseline" if method in BASELINES else "other"


def final(summary: dict, split: str, metric: str) -> float:
    return summary["final"][f"{split}_{metric}"]


def early_stopped(summary: dict, metric: str) -> dict:
    """The evaluation of a run at its step best on select (first such step): {"step", "select_*", "report_*"}."""
    sign = 1 if higher_is_better(metric) else -1
    best = max(summary["evals"], key=lambda e: (sign * e[f"select_{metric}"], -e["step"]))
    return best


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (NaN SE for one seed, NaN mean for none)."""
    if len(xs) < 2:
        return (xs[0] if xs else math.nan), math.nan
    return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs))


def rows_by_seed(summaries: list[dict], metric: str) -> dict[tuple[str, str], dict[int, dict]]:
    """(paradigm, row) -> {seed: summary} of the main table, with the early-stopped target-only row added
    (its summary's "final" replaced by the evaluation at the step best on select; its retention NaN: the
    retention check ran on the final model, not on the early-stopped one)."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for s in summaries:
        if s["sweep"]:
            continue
        out.setdefault((s["paradigm"], s["row"]), {})[s["seed"]] = s
        if s["row"] == "target":
            early = early_stopped(s, metric)
            out.setdefault((s["paradigm"], EARLY), {})[s["seed"]] = {  # retention: measured on the final model only
                **s, "row": EARLY, "final": early, "retention": math.nan}
    return out


def paired(a: dict[int, dict], b: dict[int, dict], split: str, metric: str) -> dict:
    """a minus b, seed by seed, on the common seeds: {"diff", "se", "seeds"}."""
    seeds = sorted(a.keys() & b.keys())
    diffs = [final(a[s], split, metric) - final(b[s], split, metric) for s in seeds]
    diff, se = mean_se(diffs)
    return {"diff": diff, "se": se, "seeds": len(seeds)}


@functools.cache
def verdict_se(seeds: int) -> float:
    """How many standard errors a paired difference over `seeds` seeds must exceed to count: Student's t quantile
    at VERDICT_LEVEL with seeds - 1 degrees of freedom (eq. (2) in theory/reproduction.md); NaN below 2 seeds."""
    return float(student_t.ppf(0.5 + VERDICT_LEVEL / 2, seeds - 1)) if seeds >= 2 else math.nan


def verdict(p: dict, metric: str) -> str:
    """'ahead', 'behind' or 'tied within t SE' for the first row of a paired difference (a two-sided paired
    t-test at VERDICT_LEVEL); 'unsupported' when there is no SE (fewer than 2 common seeds)."""
    if p["seeds"] < 2 or not math.isfinite(p["se"]):
        return "unsupported (fewer than 2 common seeds)"
    gain = p["diff"] if higher_is_better(metric) else -p["diff"]
    bound = verdict_se(p["seeds"]) * p["se"]
    if gain > bound:
        return "ahead"
    if -gain > bound:
        return "behind"
    return f"tied within {verdict_se(p['seeds']):.2f} SE"


def best_row(by_seed: dict, paradigm: str, kind: str, metric: str) -> str | None:
    """The row of `kind` ('dr' or 'baseline') with the best mean *select* value at the final step."""
    rows = [r for (p, r) in by_seed if p == paradigm and kind_of(r) == kind]
    if not rows:
        return None
    value = lambda r: statistics.fmean(final(s, "select", metric) for s in by_seed[(paradigm, r)].values())  # noqa
    return (max if higher_is_better(metric) else min)(rows, key=value)


def comparisons(by_seed: dict, paradigm: str, metric: str) -> list[dict]:
    """The headline comparisons of a paradigm on the report half: the best Dr row (chosen on select) against
    the best baseline, the early-stopped target-only row and standard training; each with its paired
    difference and verdict on both metrics ("verdict": the one on `metric`)."""
    dr = best_row(by_seed, paradigm, "dr", metric)
    if dr is None:
        return []
    others = [("best baseline", best_row(by_seed, paradigm, "baseline", metric)), ("early-stopped target-only", EARLY),
              ("standard training", "mean"), ("the oracle", "oracle")]
    out = []
    for what, row in others:
        if row is None or (paradigm, row) not in by_seed:
            continue
        a, b = by_seed[(paradigm, dr)], by_seed[(paradigm, row)]
        pair = {m: paired(a, b, "report", m) for m in ("accuracy", "loss")}
        out.append({"paradigm": paradigm, "dr": dr, "against": what, "row": row, "paired": pair,
                    "same_as_target": row not in ("target", EARLY)
                    and same_runs(b, by_seed.get((paradigm, "target"), {})),
                    "verdict": verdict(pair[metric], metric), "verdicts": {m: verdict(pair[m], m) for m in pair}})
    return out


def mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float]]:
    """One evaluation key over the run: (steps, mean over runs, SE over runs, 0 where undefined)."""
    steps = [e["step"] for e in runs[0]["evals"]]
    mean, se = zip(*(mean_se([r["evals"][i][key] for r in runs]) for i in range(len(steps))))
    return steps, list(mean), [0.0 if not math.isfinite(x) else x for x in se]


def same_runs(a: dict[int, dict], b: dict[int, dict]) -> bool:
    """Are two rows the same runs, seed by seed (every evaluation equal)? E.g. `hpt` under paradigm hpt is
    target-only by construction (training/rules.py)."""
    return bool(a) and a.keys() == b.keys() and all(a[s]["evals"] == b[s]["evals"] for s in a)


def overfitting(target: dict[int, dict], start: dict) -> dict:
    """Does target-only fall, then rise, on report loss? Both steps are paired t-tests over the seeds:

        falls   the report loss at each seed's early-stopping step (chosen on *select* loss) against the
                starting model's (`start`, the same model for every seed)
        rises   each seed's final report loss against its early-stopped one

    Returns {"start", "early": (mean, SE), "early_steps", "final": (mean, SE), "fall", "rise" (paired
    differences, stats.paired's form), "falls_then_rises" (both verdicts in the overfitting direction)}.
    """
    early = {s: {**r, "final": early_stopped(r, "loss")} for s, r in target.items()}
    at_start = {s: {"final": start} for s in target}
    fall, rise = paired(early, at_start, "report", "loss"), paired(target, early, "report", "loss")
    return {"start": start["report_loss"], "early": mean_se([final(r, "report", "loss") for r in early.values()]),
            "early_steps": sorted(r["final"]["step"] for r in early.values()),
            "final": mean_se([final(r, "report", "loss") for r in target.values()]), "fall": fall, "rise": rise,
            "falls_then_rises": verdict(fall, "loss") == "ahead" and verdict(rise, "loss") == "behind"}
