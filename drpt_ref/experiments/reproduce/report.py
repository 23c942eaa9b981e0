"""The report of `drpt reproduce`: tables, verdicts and figures, every sentence computed from the runs.

    results.md / results.csv   what was fixed before the runs and what the job cost; the verdicts (paired t-tests,
                               stats.py) and, for SFT, the bias-variance checks; per paradigm and row: report-half
                               accuracy and answer loss (mean +- SE over seeds), the select-half value of the
                               primary metric (what the choices read), retention, seconds per step
    curves.png                 report-half loss and accuracy against step, one column per paradigm: the two
                               endpoints, the best Dr row, the best baseline, the oracle (bands: +-1 SE)
    spectrum.png               report-half primary metric along each knob, standard training -> target-only
    weights.png                the relative weight of a general unit by source over the run (1 = uniform),
                               add3_noisy split into right and wrong samples, for the best Dr row and the
                               best baseline of each paradigm

Shapes: no tensors here.
"""

from __future__ import annotations

import csv
import math
import os
import statistics

from drpt_ref.experiments.reproduce import stats
from drpt_ref.experiments.reproduce.plan import SPECTRUM, paradigms_of

# The sources of the weights figure: the helpful and unrelated tasks pooled, the misaligned ones apart.
SOURCE_GROUPS = {"helpful (add2, carry, copy)": ("add2", "carry", "copy"),
                 "unrelated (reverse, sort)": ("reverse", "sort"), "add3_rev (reversed format)": ("add3_rev",),
                 "add3_noisy, right answer": ("add3_noisy (right)",),
                 "add3_noisy, wrong answer": ("add3_noisy (wrong)",)}


def _fmt(mean: float, se: float, digits: int) -> str:
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if math.isfinite(se) else "")


def table_rows(by_seed: dict, metric: str) -> list[dict]:
    """Per paradigm and row: report accuracy and loss (mean, SE over seeds), the select value of `metric`
    (what the choices read), retention, seconds per step."""
    rows = []
    for (paradigm, row), runs in by_seed.items():
        acc = stats.mean_se([stats.final(s, "report", "accuracy") for s in runs.values()])
        loss = stats.mean_se([stats.final(s, "report", "loss") for s in runs.values()])
        rows.append({"paradigm": paradigm, "row": row, "kind": stats.kind_of(row), "seeds": len(runs),
                     "acc_mean": acc[0], "acc_se": acc[1], "loss_mean": loss[0], "loss_se": loss[1],
                     "select_primary": statistics.fmean(stats.final(s, "select", metric) for s in runs.values()),
                     "retention": statistics.fmean(s["retention"] for s in runs.values()),
                     "sec_per_step": statistics.fmean(s["seconds_per_step"] for s in runs.values())})
    return rows


def markdown_table(rows: list[dict], metric: str) -> str:
    """One markdown table per paradigm of table_rows' rows."""
    lines = []
    for paradigm in dict.fromkeys(r["paradigm"] for r in rows):
        lines += [f"\n### {paradigm}\n", "| row | kind | seeds | report acc | report loss | "
                  f"select {metric} | retention | s/step |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['kind']} | {r['seeds']} | {_fmt(r['acc_mean'], r['acc_se'], 3)} | "
                  f"{_fmt(r['loss_mean'], r['loss_se'], 4)} | {r['select_primary']:.3f} | "
                  f"{'n/a' if math.isnan(r['retention']) else format(r['retention'], '.3f')} | "
                  f"{r['sec_per_step']:.3f} |" for r in rows if r["paradigm"] == paradigm]
    return "\n".join(lines)


def write_table(out: str, rows: list[dict], metric: str) -> str:
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return markdown_table(rows, metric)


def verdict_lines(by_seed: dict, paradigms: list[str], metric: str) -> list[str]:
    lines = []
    for paradigm in paradigms:
        for c in stats.comparisons(by_seed, paradigm, metric):
            acc, loss = c["paired"]["accuracy"], c["paired"]["loss"]
            v = c["verdicts"]
            same = (f" (`{c['row']}` is the target-only run seed by seed: this compares Dr with target-only)"
                    if c["same_as_target"] else "")
            lines.append(f"- {paradigm}: best Dr `{c['dr']}` against {c['against']} `{c['row']}`{same} "
                         f"({acc['seeds']} paired seed{'s' * (acc['seeds'] != 1)}): "
                         f"loss {loss['diff']:+.4f} ± {loss['se']:.4f} "
                         f"(**{v['loss']}**), accuracy {acc['diff']:+.3f} ± {acc['se']:.3f} (**{v['accuracy']}**).")
    return lines


def _pm(p: dict, digits: int) -> str:
    return f"{p['diff']:+.{digits}f} ± {p['se']:.{digits}f}"


def phenomenon_lines(by_seed: dict, start: dict, metric: str, paradigm: str = "sft") -> list[str]:
    """The bias-variance checks of one paradigm as sentences, each a paired t-test over seeds on the report half
    (stats.verdict): does target-only fall, then rise (variance; stats.overfitting), does standard training end
    above the best Dr row chosen on select (bias; stats.comparisons)? And the oracle's accuracy."""
    lines = []
    target = by_seed.get((paradigm, "target"), {})
    if target:
        o = stats.overfitting(target, start)
        fall, rise = stats.verdict(o["fall"], "loss"), stats.verdict(o["rise"], "loss")
        said = ("it falls, then rises: overfitting shown." if o["falls_then_rises"] else
                "unsupported: fewer than 2 seeds." if "unsupported" in fall + rise else
                "overfitting NOT shown at this level.")
        lines.append(f"- {paradigm} target-only (report loss, {len(target)} seeds): {o['start']:.3f} at the start; "
                     f"{_fmt(*o['early'], 3)} at each seed's early-stopping step (chosen on select: steps "
                     f"{', '.join(map(str, o['early_steps']))}), paired change from the start {_pm(o['fall'], 3)} "
                     f"({'falls' if fall == 'ahead' else fall}); {_fmt(*o['final'], 3)} at the end, paired change "
                     f"from the early-stopped {_pm(o['rise'], 3)} ({'rises' if rise == 'behind' else rise}): {said}")
    bias = [c for c in stats.comparisons(by_seed, paradigm, metric) if c["row"] == "mean"]
    if bias:
        c = bias[0]
        p, v = c["paired"]["loss"], c["verdicts"]["loss"]
        said = ("standard training stays above it: bias shown." if v == "ahead" else
                "unsupported: fewer than 2 seeds." if v.startswith("unsupported") else
                f"bias NOT shown ({v} for the Dr row).")
        mean = stats.mean_se([stats.final(s, "report", "loss") for s in by_seed[(paradigm, "mean")].values()])
        lines.append(f"- {paradigm} standard training (`mean`): final report loss {_fmt(*mean, 3)}; the best Dr row "
                     f"chosen on select, `{c['dr']}`, minus `mean`, paired over {p['seeds']} seeds: {_pm(p, 4)}: "
                     + said)
    if (paradigm, "oracle") in by_seed:
        acc = stats.mean_se([stats.final(s, "report", "accuracy") for s in by_seed[(paradigm, "oracle")].values()])
        lines.append(f"- {paradigm} oracle (target-only on fresh target samples): report accuracy "
                     f"{_fmt(acc[0], acc[1], 3)} at the last step.")
    return lines


def source_weights(by_seed: dict, paradigm: str, row: str) -> dict[str, float]:
    """Mean relative weight (1 = uniform) of each source group over the run and the seeds of one row."""
    runs = list(by_seed.get((paradigm, row), {}).values())
    out = {}
    for label, names in SOURCE_GROUPS.items():
        xs = [x for r in runs for n in names for x in r["weights"].get(n, []) if x is not None]
        if xs:
            out[label] = statistics.fmean(xs)
    return out


def story(by_seed: dict, paradigm: str, metric: str) -> str:
    """A paragraph computed from the runs: the best Dr row chosen on the select half against the best baseline
    (paired over seeds on the report half, with its verdict), and which sources that Dr row weighted."""
    text = []
    for c in stats.comparisons(by_seed, paradigm, metric):
        if c["against"] == "best baseline":
            p = c["paired"][metric]
            text.append(f"On {paradigm}, the best Dr row chosen on the select half, `{c['dr']}`, against the best "
                        f"baseline `{c['row']}`: report {metric} {p['diff']:+.3f} ± {p['se']:.3f} (paired over "
                        f"{p['seeds']} seeds), so it is {c['verdict']}.")
            weights = source_weights(by_seed, paradigm, c["dr"])
            if weights:
                ranked = sorted(weights.items(), key=lambda kv: -kv[1])
                text.append(f"It weighted {ranked[0][0]} most ({ranked[0][1]:.2f}x the uniform weight) and "
                            f"{ranked[-1][0]} least ({ranked[-1][1]:.2f}x).")
    return " ".join(text) or f"No {paradigm} comparison of a Dr row against a baseline in these runs."


def plot_curves(by_seed: dict, paradigms: list[str], start: dict, metric: str, oracle_size: int):
    """The figure of curves.png (returned, not saved)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(paradigms), figsize=(4.2 * len(paradigms), 6.4), squeeze=False)
    for col, paradigm in enumerate(paradigms):
        rows = [("target", "target-only", "C3"), ("mean", "standard (mean)", "C7"),
                (stats.best_row(by_seed, paradigm, "dr", metric), "best Dr", "C0"),
                (stats.best_row(by_seed, paradigm, "baseline", metric), "best baseline", "C1"),
                ("oracle", f"oracle ({oracle_size:,} target)", "k")]
        for r, key in enumerate(("report_loss", "report_accuracy")):
            ax = axes[r][col]
            for row, what, color in rows:
                runs = list(by_seed.get((paradigm, row), {}).values())
                if not runs:
                    continue
                steps, mean, se = stats.mean_curve(runs, key)
                same = row not in ("target", stats.EARLY) and stats.same_runs(by_seed[(paradigm, row)],
                                                           by_seed.get((paradigm, "target"), {}))
                steps, mean, se = [0] + steps, [start[key]] + mean, [0.0] + se
                ax.plot(steps, mean, color=color, ls="--" if row == "oracle" or same else "-", lw=1.4,
                        label=(f"{what}: {row}" + (" (= target-only)" if same else "")) if what.startswith("best")
                        else what)
                ax.fill_between(steps, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                                color=color, alpha=0.15, lw=0)
            ax.set_xlabel("step")
            ax.set_ylabel("held-out answer loss (nats/token)" if key == "report_loss" else "held-out exact match")
            ax.set_title(f"{paradigm}: {'loss' if key == 'report_loss' else 'accuracy'} (report half)", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle("mean over seeds; bands: ±1 standard error", fontsize=9)
    fig.tight_layout()
    return fig


KNOB_AXES = {"k": "k, units kept (capped simplex)", "tau_rel": "tau / spread of b (softmax)",
             "ridge_rel": "ridge / mean K_ii (subspace)", "radius_rel": "radius / ||g_T - mean|| (ball)"}


def at_point(summary: dict, knob: str, method: str, value: float) -> bool:
    """Does this run sit at the spectrum point knob = value: a sweep run there, or the main-table global row of
    `method` whose knob has that value (plan.in_main_table does not run it twice)?"""
    if summary["sweep"]:
        return summary["sweep"] == knob and dict(map(tuple, summary["knobs"]))[knob] == value
    return summary["row"] == method and summary["paradigm"] == "sft" and summary["config"]["train"][knob] == value


def plot_spectrum(summaries: list[dict], by_seed: dict, metric: str):
    """The figure of spectrum.png (returned, not saved); None without sweep runs."""
    import matplotlib.pyplot as plt

    sweeps = [k for k in SPECTRUM if any(s["sweep"] == k for s in summaries)]
    if not sweeps:
        return None
    key = f"report_{metric}"
    fig, axes = plt.subplots(1, len(sweeps), figsize=(3.8 * len(sweeps), 3.4), squeeze=False)
    for ax, knob in zip(axes[0], sweeps):
        method, values = SPECTRUM[knob]
        pts = []
        for i, v in enumerate(values):
            xs = list({s["seed"]: s["final"][key] for s in summaries if at_point(s, knob, method, v)}.values())
            if xs:
                pts.append((i, *stats.mean_se(xs), len(xs)))
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                    yerr=[p[2] if math.isfinite(p[2]) else 0.0 for p in pts], marker="o", capsize=3,
                    label=f"{method} ({'-'.join(sorted({str(p[3]) for p in pts}, key=int))} seeds)")
        for row, style in (("mean", "--"), ("target", ":")):
            runs = by_seed.get(("sft", row), {})
            if runs:
                ax.axhline(statistics.fmean(s["final"][key] for s in runs.values()), color="gray", ls=style,
                           label=f"{'standard' if row == 'mean' else 'target-only'}")
        ax.set_xticks(range(len(values)), [f"{v:g}" for v in values])
        ax.set_xlabel(KNOB_AXES[knob] + "\nstandard -> target-only", fontsize=8)
        ax.set_ylabel(f"held-out {metric} (report half)")
        ax.legend(fontsize=7)
    fig.suptitle("SFT, final step; error bars: ±1 standard error over seeds", fontsize=9)
    fig.tight_layout()
    return fig


def _group_curve(runs: list[dict], names: tuple) -> tuple[list[int], list[float]]:
    steps = runs[0]["weights"]["steps"]
    vals = []
    for i in range(len(steps)):
        xs = [r["weights"][n][i] for r in runs for n in names if n in r["weights"] and r["weights"][n][i] is not None]
        vals.append(statistics.fmean(xs) if xs else math.nan)
    return steps, vals


def plot_weights(by_seed: dict, paradigms: list[str], metric: str):
    """The figure of weights.png (returned, not saved); None when no row logged weights."""
    import matplotlib.pyplot as plt

    panels = [(p, stats.best_row(by_seed, p, kind, metric), kind) for p in paradigms for kind in ("dr", "baseline")]
    panels = [(p, r, k) for p, r, k in panels if r is not None and all(
        s["weights"]["steps"] for s in by_seed[(p, r)].values())]
    if not panels:
        return None
    cols = 2
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(5.2 * cols, 3.0 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, (paradigm, row, kind) in zip(axes.flat, panels):
        runs = list(by_seed[(paradigm, row)].values())
        for j, (label, names) in enumerate(SOURCE_GROUPS.items()):
            steps, vals = _group_curve(runs, names)
            if any(math.isfinite(v) for v in vals):  # a group these runs never logged (GRPO: no wrong add3_noisy)
                ax.plot(steps, vals, color=f"C{j}", lw=1.4, label=label)  # is not drawn, nor in the legend
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        ax.set_title(f"{paradigm}: best {'Dr' if kind == 'dr' else 'baseline'} `{row}`", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("weight / uniform weight")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("mean weight of a general unit by source, relative to standard training's (1, dotted); mean over "
                 "seeds and each window of steps\n(GRPO, HPT: no add3_noisy sample is wrong, their units are prompts "
                 "scored against the right answer)", fontsize=9)
    fig.tight_layout()
    return fig


def header(cfg, summaries: list[dict], start: dict, timing: dict | None) -> str:
    """The paragraph of what was fixed before the runs, how verdicts are made, and what the job cost."""
    def seeds(k: int) -> str:
        return f"{k} seed{'s' * (k != 1)}"

    worker_min = sum(s["wall_seconds"] for s in summaries) / 60
    cost = (f"Runs: {len(summaries)}, {worker_min:.1f} worker-minutes; this call's wall clock "
            f"{timing['wall_seconds'] / 60:.1f} min on {timing['cpus']} CPUs with {timing['workers']} workers, load "
            f"average {timing['load_start']:.2f} at the start and {timing['load_end']:.2f} at the end "
            f"({timing['machine']})." if timing else
            f"Runs: {len(summaries)}, {worker_min:.1f} worker-minutes (wall clock and load not recorded).")
    others = [p for p in paradigms_of(cfg) if p != "sft"]
    return (f"Fixed before the runs: {seeds(cfg.seeds)} per row ({seeds(cfg.spectrum_seeds)} per spectrum point), "
            f"{cfg.steps} steps of AdamW at lr {cfg.lr:g}, n = {cfg.n_general} general and m = {cfg.m_target} "
            f"target units per step, a target set of {cfg.target_size}; the oracle: {cfg.oracle_size} fresh target "
            f"samples, m = {cfg.oracle_m_target}, lr {cfg.oracle_lr:g} after {cfg.oracle_warmup} warmup steps. "
            f"Model {cfg.model}, device {cfg.device}; primary metric: {cfg.primary}. "
            + (f"{', '.join(o.upper() for o in others)} run in the SFT regime; only the lr was searched for DPO and "
               "GRPO, on one seed, after the headline (theory/reproduction.md §3). " if others else "")
            + "Best rows and the early-stopping step are chosen on the select half of the held-out target prompts; "
            f"every number below is on the report half ({cfg.eval_n} prompts each). ± is one standard error over "
            "seeds. The choices on select are made on the same trained models as the report numbers (select and "
            "report values of a run correlate), so picking the best of several rows carries some of a seed's luck "
            "into the report half, and no correction for the number of verdicts is made. A verdict is a two-sided "
            "paired t-test at 95 % over the common seeds (ahead / behind beyond "
            + (f"t SE, t = {stats.verdict_se(cfg.seeds):.2f} at {cfg.seeds} seeds). " if cfg.seeds >= 2 else
               "t SE; with 1 seed every verdict is unsupported). ") + f"Starting model: report accuracy "
            f"{start['report_accuracy']:.3f}, loss {start['report_loss']:.4f}. " + cost)


def write_report(cfg, summaries: list[dict], start: dict, timing: dict | None = None) -> str:
    """Write results.md, results.csv and the figures into cfg.out; returns results.md's text. `timing`: the
    job's wall clock and load (run.py's timing.json), or None where it was not recorded."""
    import matplotlib

    matplotlib.use("Agg")
    metric = cfg.primary
    paradigms = [p for p in paradigms_of(cfg) if any(s["paradigm"] == p for s in summaries)]
    by_seed = stats.rows_by_seed(summaries, metric)
    rows = table_rows(by_seed, metric)
    table = write_table(cfg.out, rows, metric)
    import matplotlib.pyplot as plt

    figures = {"curves.png": plot_curves(by_seed, paradigms, start, metric, cfg.oracle_size),
               "spectrum.png": plot_spectrum(summaries, by_seed, metric),
               "weights.png": plot_weights(by_seed, paradigms, metric)}
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(os.path.join(cfg.out, name), dpi=110)
            plt.close(fig)
    text = "\n".join([f"# drpt reproduce --{cfg.mode}\n", header(cfg, summaries, start, timing),
                      "\n## Verdicts (paired by seed, report half)\n", *verdict_lines(by_seed, paradigms, metric)]
                     + (["\n## Bias and variance (SFT)\n", *phenomenon_lines(by_seed, start, metric)]
                        if "sft" in paradigms else []) + ["\n## Tables", table, ""])
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(text)
    return text
