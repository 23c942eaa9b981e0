"""The statistics of `drpt reproduce`: rows over seeds, paired differences, choices on select, verdicts.

Every number a verdict rests on is computed here from the run summaries (run.py), so the prose of the
report (report.py) and of the notebooks cannot contradict the tables. Conventions:

    metric      "accuracy" (greedy exact match, higher is better) or "loss" (answer NLL, lower is better)
    split       "select" (used to choose: the best Dr method, the best baseline, the early-stopping step)
                or "report" (every reported number); disjoint halves of the held-out prompts
    SE          the standard error of a mean over seeds, std / sqrt(k) (sample std, k - 1 in it)
    paired      the difference of two rows seed by seed (the same seed draws the same data), then its mean
                and SE: the seed-to-seed spread that both rows share cancels
    verdict     "ahead" / "behind" when the paired difference is more than 2 SE in favour / against,
                otherwise "tied within 2 SE"; "unsupported" below 2 common seeds (no SE)

Shapes: no tensors here.
"""

from __future__ import annotations

import math
import statistics

from drpt_ref.experiments.reproduce.plan import BASELINES, DR_METHODS

VERDICT_SE = 2.0  # a difference counts when it exceeds this many standard errors (about a 95% interval)
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
    """Mean and standard error over seeds (0 SE for one seed)."""
    if len(xs) < 2:
        return (xs[0] if xs else math.nan), math.nan
    return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs))


def rows_by_seed(summaries: list[dict], metric: str) -> dict[tuple[str, str], dict[int, dict]]:
    """(paradigm, row) -> {seed: summary} of the main table, with the early-stopped target-only row added
    (its summary's "final" replaced by the evaluation at the step best on select)."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for s in summaries:
        if s["sweep"]:
            continue
        out.setdefault((s["paradigm"], s["row"]), {})[s["seed"]] = s
        if s["row"] == "target":
            early = early_stopped(s, metric)
            out.setdefault((s["paradigm"], EARLY), {})[s["seed"]] = {**s, "row": EARLY, "final": early}
    return out


def paired(a: dict[int, dict], b: dict[int, dict], split: str, metric: str) -> dict:
    """a minus b, seed by seed, on the common seeds: {"diff", "se", "seeds"}."""
    seeds = sorted(a.keys() & b.keys())
    diffs = [final(a[s], split, metric) - final(b[s], split, metric) for s in seeds]
    diff, se = mean_se(diffs)
    return {"diff": diff, "se": se, "seeds": len(seeds)}


def verdict(p: dict, metric: str) -> str:
    """'ahead', 'behind' or 'tied within 2 SE' for the first row of a paired difference; 'unsupported' when
    there is no SE (fewer than 2 common seeds)."""
    if p["seeds"] < 2 or not math.isfinite(p["se"]):
        return "unsupported (fewer than 2 common seeds)"
    gain = p["diff"] if higher_is_better(metric) else -p["diff"]
    if gain > VERDICT_SE * p["se"]:
        return "ahead"
    if -gain > VERDICT_SE * p["se"]:
        return "behind"
    return f"tied within {VERDICT_SE:g} SE"


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
                    "verdict": verdict(pair[metric], metric), "verdicts": {m: verdict(pair[m], m) for m in pair}})
    return out


def overfitting(summary_runs: list[dict], start: dict) -> dict:
    """A row's report loss over the run, mean over seeds, against the starting model's `start` evaluation:
    its minimum (step, value) and final value; 'falls_then_rises' when the minimum is below the start and the
    final loss above the minimum by more than 2 SE of the final values."""
    steps = [e["step"] for e in summary_runs[0]["evals"]]
    curve = [statistics.fmean(s["evals"][i]["report_loss"] for s in summary_runs) for i in range(len(steps))]
    i_min = min(range(len(curve)), key=curve.__getitem__)
    _, se_end = mean_se([s["evals"][-1]["report_loss"] for s in summary_runs])
    start = start["report_loss"]
    rises = curve[-1] - curve[i_min] > VERDICT_SE * (se_end if math.isfinite(se_end) else 0.0)
    return {"start": start, "min_step": steps[i_min], "min": curve[i_min], "final": curve[-1],
            "falls_then_rises": curve[i_min] < start and i_min < len(curve) - 1 and rises}
