"""The statistics behind the reproduction's verdicts, against numbers computed here by hand (numpy):
paired differences and their standard errors, the paired t-test verdicts, choices made on the select half only,
the early-stopped row, the overfitting check, and the weights by source with add3_noisy split by its flag."""

import math

import numpy as np
import pytest

from drpt_ref.experiments.reproduce import stats
from drpt_ref.experiments.reproduce.run import weights_by_source


def _run(paradigm, row, seed, evals, **extra):
    return {"paradigm": paradigm, "row": row, "seed": seed, "sweep": "", "evals": evals, "final": evals[-1],
            "retention": 0.5, "seconds_per_step": 0.1, **extra}


def _eval(step, sel_acc, rep_acc, sel_loss=1.0, rep_loss=1.0):
    return {"step": step, "select_accuracy": sel_acc, "report_accuracy": rep_acc, "select_loss": sel_loss,
            "report_loss": rep_loss, "select_partial": 0.0, "report_partial": 0.0}


def test_paired_difference_and_its_standard_error_match_numpy():
    a_acc, b_acc = [0.52, 0.61, 0.48, 0.55, 0.58], [0.50, 0.55, 0.49, 0.47, 0.51]
    a = {s: _run("sft", "simplex", s, [_eval(10, 0, x)]) for s, x in enumerate(a_acc)}
    b = {s: _run("sft", "less", s, [_eval(10, 0, x)]) for s, x in enumerate(b_acc)}
    b.pop(4)  # only common seeds are paired
    p = stats.paired(a, b, "report", "accuracy")
    d = np.array(a_acc[:4]) - np.array(b_acc[:4])
    assert p["seeds"] == 4
    assert p["diff"] == pytest.approx(d.mean(), abs=1e-15)
    assert p["se"] == pytest.approx(d.std(ddof=1) / 2.0, rel=1e-12)


@pytest.mark.parametrize("diff, se, metric, expected", [
    (0.06, 0.02, "accuracy", "ahead"), (0.05, 0.02, "accuracy", "tied within 2.78 SE"),
    (-0.06, 0.02, "accuracy", "behind"), (-0.06, 0.02, "loss", "ahead"), (0.06, 0.02, "loss", "behind")])
def test_verdict_is_a_paired_t_test_in_the_metric_direction(diff, se, metric, expected):
    assert stats.verdict({"diff": diff, "se": se, "seeds": 5}, metric) == expected


def test_verdict_bound_is_students_t_quantile():
    # Tabulated two-sided 95 % quantiles of Student's t: 1 df (Cauchy: tan(0.475 pi)), 4 df, 29 df.
    assert stats.verdict_se(2) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-9)
    assert stats.verdict_se(5) == pytest.approx(2.776445, abs=1e-6)
    assert stats.verdict_se(30) == pytest.approx(2.045230, abs=1e-6)


@pytest.mark.parametrize("seeds", [2, 5])
def test_verdict_calls_about_five_percent_of_true_ties(seeds):
    """Under no difference (paired differences drawn from one normal law), a non-tie verdict happens at the
    test's level, 5 %, at every number of seeds; a flat 2-SE rule would call 29.5 % at 2 seeds."""
    rng = np.random.default_rng(0)
    d = rng.normal(size=(20000, seeds))  # (trials, seeds)
    p = [{"diff": x.mean(), "se": x.std(ddof=1) / math.sqrt(seeds), "seeds": seeds} for x in d]
    rate = np.mean([not stats.verdict(q, "loss").startswith("tied") for q in p])
    assert rate == pytest.approx(0.05, abs=0.006)  # binomial SE at 20,000 trials: 0.0015


def test_best_rows_and_early_stopping_are_chosen_on_select_never_on_report():
    # capped_simplex is better on select, simplex on report: the choice must follow select.
    runs = [_run("sft", "capped_simplex", s, [_eval(10, 0.6, 0.1)]) for s in range(3)]
    runs += [_run("sft", "simplex", s, [_eval(10, 0.2, 0.9)]) for s in range(3)]
    runs += [_run("sft", "target", s, [_eval(10, 0.1, 0.9), _eval(20, 0.3, 0.2), _eval(30, 0.3, 0.8)])
             for s in range(3)]
    by_seed = stats.rows_by_seed(runs, "accuracy")
    assert stats.best_row(by_seed, "sft", "dr", "accuracy") == "capped_simplex"
    early = by_seed[("sft", stats.EARLY)][0]["final"]
    assert early["step"] == 20 and early["report_accuracy"] == 0.2  # the first step best on select
    by_loss = stats.rows_by_seed([_run("sft", "target", 0, [_eval(10, 0, 0, 0.9, 0.1), _eval(20, 0, 0, 0.5, 0.7)])],
                                 "loss")
    assert by_loss[("sft", stats.EARLY)][0]["final"]["step"] == 20  # lower loss is better


def test_overfitting_is_a_fall_then_a_rise_each_by_a_paired_t_test():
    def target(losses_by_seed, select=None):
        select = select or losses_by_seed
        return {s: _run("sft", "target", s, [_eval(10 * (i + 1), 0, 0, y, x) for i, (x, y) in enumerate(zip(ls, ss))])
                for s, (ls, ss) in enumerate(zip(losses_by_seed, select))}
    start = {"report_loss": 1.0}
    o = stats.overfitting(target([[0.8, 0.9, 1.4], [0.78, 0.9, 1.5], [0.82, 1.0, 1.3]]), start)
    assert o["falls_then_rises"] and o["early_steps"] == [10, 10, 10]
    assert o["early"][0] == pytest.approx(0.8) and o["final"][0] == pytest.approx(1.4)
    assert o["fall"]["diff"] == pytest.approx(-0.2) and o["rise"]["diff"] == pytest.approx(0.6)
    # the spread of the fall (-0.2, -0.3, -0.1) is too wide for 3 seeds: t = 3.46 < 4.30
    assert not stats.overfitting(target([[0.8, 0.9, 1.4], [0.7, 0.9, 1.5], [0.9, 1.0, 1.3]]), start)["falls_then_rises"]
    assert not stats.overfitting(target([[0.9, 0.8, 0.7], [0.8, 0.7, 0.6]]), start)["falls_then_rises"]  # no rise
    assert not stats.overfitting(target([[1.1, 1.2, 1.4], [1.2, 1.3, 1.5]]), start)["falls_then_rises"]  # no fall
    one = stats.overfitting(target([[0.5, 0.6, 2.0]]), start)
    assert not one["falls_then_rises"] and stats.verdict(one["fall"], "loss").startswith("unsupported")
    # the early-stopping step is chosen on the select half: its minimum is at step 30, the report's at 10
    o = stats.overfitting(target([[0.8, 0.9, 1.0]] * 2, select=[[0.9, 0.8, 0.7]] * 2), start)
    assert o["early_steps"] == [30, 30] and o["early"][0] == pytest.approx(1.0)


def test_weights_by_source_relative_to_uniform_with_the_noisy_task_split():
    rec = lambda step, w, src, bad: {"step": step, "weights": w, "sources": src, "corrupted": bad}  # noqa: E731
    src = ["add2", "add3_noisy", "add3_noisy", "add3_rev"]
    metrics = [rec(1, [[0.4, 0.4, 0.0, 0.2]], src, [False, False, True, False]),
               rec(2, [[0.0, 0.0, 0.0, 0.0]], src, [False, False, True, False]),  # target-only: left out
               rec(3, [[0.1, 0.5, 0.1, 0.1], [0.3, 0.3, 0.1, 0.1]], src, [False, False, True, False])]  # per layer
    out = weights_by_source(metrics, window=2)
    assert out["steps"] == [2, 3]  # the last window ends at the run's last step
    # step 1: uniform = 1/4, add2 0.4 -> 1.6; step 3: layer mean [0.2, 0.4, 0.1, 0.1], uniform 0.2 -> 1.0, 2.0
    assert out["add2"] == pytest.approx([1.6, 1.0])
    assert out["add3_noisy (right)"] == pytest.approx([1.6, 2.0])
    assert out["add3_noisy (wrong)"] == pytest.approx([0.0, 0.5])
    assert out["add3_rev"] == pytest.approx([0.8, 0.5])


def test_a_baseline_that_is_target_only_seed_by_seed_is_named_so():
    """HPT's `hpt` row is target-only by construction: the verdict line says so instead of calling it a baseline
    beaten; the early-stopped row's retention is n/a (the retention check ran on the final model)."""
    from drpt_ref.experiments.reproduce import report

    target = [_run("hpt", "target", s, [_eval(10, 0.1, 0.1, 0.9, 0.9 + s / 10)], retention=0.5) for s in range(3)]
    hpt = [{**r, "row": "hpt"} for r in target]
    dr = [_run("hpt", "capped_simplex-pl", s, [_eval(10, 0.2, 0.2, 0.5, 0.5 + s / 9)]) for s in range(3)]
    by_seed = stats.rows_by_seed(target + hpt + dr, "loss")
    (c,) = [c for c in stats.comparisons(by_seed, "hpt", "loss") if c["against"] == "best baseline"]
    assert c["row"] == "hpt" and c["same_as_target"]
    assert "is the target-only run seed by seed" in report.verdict_lines(by_seed, ["hpt"], "loss")[0]
    other = [{**r, "row": "hpt", "evals": [_eval(10, 0.1, 0.1, 0.9, 0.95)]} for r in target]
    assert not stats.same_runs(stats.rows_by_seed(other, "loss")[("hpt", "hpt")], by_seed[("hpt", "target")])
    table = report.markdown_table(report.table_rows(by_seed, "loss"), "loss")
    assert "| target (early-stopped) | endpoint | 3 |" in table and "| n/a |" in table


def test_weights_figure_legend_lists_exactly_the_lines_drawn():
    """weights.png: each panel's legend names exactly the curves it draws. GRPO runs log no wrong add3_noisy
    sample (their units are prompts), so their panels have no such line and no such legend entry; the SFT
    panels have both. Each drawn curve is the mean over seeds and the group's sources, computed here by hand."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from drpt_ref.experiments.reproduce import report


    def weights(paradigm, seed):  # as run.weights_by_source stores them: {"steps", source: [value or None]}
        w = {"steps": [5, 10], "add2": [1.0 + seed, 2.0], "carry": [0.5, None], "copy": [1.5, 1.0],
             "reverse": [0.2, 0.4 + seed], "sort": [0.6, 0.8], "add3_rev": [None, 0.3],
             "add3_noisy (right)": [1.2, 1.1]}
        if paradigm == "sft":
            w["add3_noisy (wrong)"] = [0.1 * (seed + 1), 0.05]
        return w

    runs = [_run(p, row, s, [_eval(10, 0.5, 0.5)], weights=weights(p, s))
            for p, rows in (("sft", ("simplex", "less")), ("grpo", ("capped_simplex", "random"))) for row in rows
            for s in range(2)]
    fig = report.plot_weights(stats.rows_by_seed(runs, "accuracy"), ["sft", "grpo"], "accuracy")
    try:
        panels = [ax for ax in fig.axes if ax.get_title()]
        assert len(panels) == 4
        for ax in panels:
            drawn = {ln.get_label(): ln for ln in ax.get_lines() if not ln.get_label().startswith("_")}
            assert all(np.isfinite(ln.get_ydata().astype(float)).any() for ln in drawn.values())  # each one visible
            legend = [t.get_text() for t in ax.get_legend().get_texts()]
            assert sorted(legend) == sorted(drawn)  # every entry is a line drawn, every line has its entry
            expected = set(report.SOURCE_GROUPS) - ({"add3_noisy, wrong answer"} if "grpo" in ax.get_title() else set())
            assert set(drawn) == expected, ax.get_title()
            helpful = drawn["helpful (add2, carry, copy)"].get_ydata()  # seeds 0, 1: add2 1|2, carry 0.5, copy 1.5
            assert list(helpful) == pytest.approx([np.mean([1, 0.5, 1.5, 2, 0.5, 1.5]), np.mean([2, 1, 2, 1])])
            rev = drawn["add3_rev (reversed format)"].get_ydata()  # None in the first window: a gap, not a 0
            assert math.isnan(rev[0]) and rev[1] == pytest.approx(0.3)
        wrong = [ln for ax in panels for ln in ax.get_lines() if ln.get_label() == "add3_noisy, wrong answer"]
        assert len(wrong) == 2 and list(wrong[0].get_ydata()) == pytest.approx([0.15, 0.05])
    finally:
        plt.close(fig)
