"""The statistics behind the reproduction's verdicts, against numbers computed here by hand (numpy):
paired differences and their standard errors, the 2-SE verdicts, choices made on the select half only,
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
    (0.05, 0.02, "accuracy", "ahead"), (0.03, 0.02, "accuracy", "tied within 2 SE"),
    (-0.05, 0.02, "accuracy", "behind"), (-0.05, 0.02, "loss", "ahead"), (0.05, 0.02, "loss", "behind")])
def test_verdict_is_two_standard_errors_in_the_metric_direction(diff, se, metric, expected):
    assert stats.verdict({"diff": diff, "se": se, "seeds": 5}, metric) == expected


def test_one_seed_gives_no_verdict():
    assert stats.verdict({"diff": 0.5, "se": math.nan, "seeds": 1}, "accuracy").startswith("unsupported")


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


def test_overfitting_needs_a_fall_below_the_start_and_a_rise_beyond_two_se():
    def target(losses_by_seed):
        return [_run("sft", "target", s, [_eval(10 * (i + 1), 0, 0, 0, x) for i, x in enumerate(ls)])
                for s, ls in enumerate(losses_by_seed)]
    start = {"report_loss": 1.0}
    o = stats.overfitting(target([[0.8, 0.9, 1.4], [0.7, 0.9, 1.5], [0.9, 1.0, 1.3]]), start)
    assert o["falls_then_rises"] and o["min_step"] == 10 and o["min"] == pytest.approx(0.8)
    assert o["final"] == pytest.approx(1.4)
    assert not stats.overfitting(target([[0.9, 0.8, 0.7], [0.8, 0.7, 0.6]]), start)["falls_then_rises"]
    assert not stats.overfitting(target([[1.1, 1.2, 1.4], [1.2, 1.3, 1.5]]), start)["falls_then_rises"]


def test_weights_by_source_relative_to_uniform_with_the_noisy_task_split():
    rec = lambda step, w, src, bad: {"step": step, "weights": w, "sources": src, "corrupted": bad}  # noqa: E731
    src = ["add2", "add3_noisy", "add3_noisy", "add3_rev"]
    metrics = [rec(1, [[0.4, 0.4, 0.0, 0.2]], src, [False, False, True, False]),
               rec(2, [[0.0, 0.0, 0.0, 0.0]], src, [False, False, True, False]),  # target-only: left out
               rec(3, [[0.1, 0.5, 0.1, 0.1], [0.3, 0.3, 0.1, 0.1]], src, [False, False, True, False])]  # per layer
    out = weights_by_source(metrics, window=2)
    assert out["steps"] == [2, 4]
    # step 1: uniform = 1/4, add2 0.4 -> 1.6; step 3: layer mean [0.2, 0.4, 0.1, 0.1], uniform 0.2 -> 1.0, 2.0
    assert out["add2"] == pytest.approx([1.6, 1.0])
    assert out["add3_noisy (right)"] == pytest.approx([1.6, 2.0])
    assert out["add3_noisy (wrong)"] == pytest.approx([0.0, 0.5])
    assert out["add3_rev"] == pytest.approx([0.8, 0.5])
