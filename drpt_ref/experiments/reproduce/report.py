"""The report of `drpt reproduce`: tables, verdicts and figures, every sentence computed from the runs.

    results.md / results.csv   per paradigm and row: report-half accuracy and answer loss (mean +- SE over
                               seeds), the select-half accuracy the choices used, retention, seconds per
                               step; then the verdicts (stats.py) and, for SFT, the bias-variance checks
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


def table_rows(by_seed: dict) -> list[dict]:
    rows = []
    for (paradigm, row), runs in by_seed.items():
        acc = stats.mean_se([stats.final(s, "report", "accuracy") for s in runs.values()])
        loss = stats.mean_se([stats.final(s, "report", "loss") for s in runs.values()])
        rows.append({"paradigm": paradigm, "row": row, "kind": stats.kind_of(row), "seeds": len(runs),
                     "acc_mean": acc[0], "acc_se": acc[1], "loss_mean": loss[0], "loss_se": loss[1],
                     "select_acc": statistics.fmean(stats.final(s, "select", "accuracy") for s in runs.values()),
                     "retention": statistics.fmean(s["retention"] for s in runs.values()),
                     "sec_per_step": statistics.fmean(s["seconds_per_step"] for s in runs.values())})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """One markdown table per paradigm of table_rows' rows."""
    lines = []
    for paradigm in dict.fromkeys(r["paradigm"] for r in rows):
        lines += [f"\n### {paradigm}\n", "| row | kind | seeds | report acc | report loss | select acc | retention | "
                  "s/step |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {r['kind']} | {r['seeds']} | {_fmt(r['acc_mean'], r['acc_se'], 3)} | "
                  f"{_fmt(r['loss_mean'], r['loss_se'], 4)} | {r['select_acc']:.3f} | {r['retention']:.3f} | "
                  f"{r['sec_per_step']:.3f} |" for r in rows if r["paradigm"] == paradigm]
    return "\n".join(lines)


def write_table(out: str, rows: list[dict]) -> str:
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return markdown_table(rows)


def verdict_lines(by_seed: dict, paradigms: list[str], metric: str) -> list[str]:
    lines = []
    for paradigm in paradigms:
        for c in stats.comparisons(by_seed, paradigm, metric):
            acc, loss = c["paired"]["accuracy"], c["paired"]["loss"]
            v = c["verdicts"]
            lines.append(f"- {paradigm}: best Dr `{c['dr']}` against {c['against']} `{c['row']}` "
                         f"({acc['seeds']} paired seeds): loss {loss['diff']:+.4f} ± {loss['se']:.4f} "
                         f"(**{v['loss']}**), accuracy {acc['diff']:+.3f} ± {acc['se']:.3f} (**{v['accuracy']}**).")
    return lines


def phenomenon_lines(by_seed: dict, start: dict, paradigm: str = "sft") -> list[str]:
    """The bias-variance checks of one paradigm, as sentences: does target-only fall then rise (variance),
    does standard training stay above the best row (bias)?"""
    lines = []
    target = list(by_seed.get((paradigm, "target"), {}).values())
    if target:
        o = stats.overfitting(target, start)
        lines.append(f"- {paradigm} target-only: report loss {o['start']:.3f} at the start, lowest {o['min']:.3f} at "
                     f"step {o['min_step']}, {o['final']:.3f} at the end: "
                     + ("it falls, then rises (overfitting)." if o["falls_then_rises"] else
                        "it does NOT fall then rise by more than 2 SE."))
    if (paradigm, "mean") in by_seed:
        finals = {row: statistics.fmean(stats.final(s, "report", "loss") for s in runs.values())
                  for (p, row), runs in by_seed.items() if p == paradigm and row not in ("oracle",)}
        best = min(finals, key=finals.get)
        mean = stats.mean_se([stats.final(s, "report", "loss") for s in by_seed[(paradigm, "mean")].values()])
        above = best != "mean" and mean[0] - finals[best] > stats.VERDICT_SE * (mean[1] if math.isfinite(mean[1])
                                                                                 else 0.0)
        lines.append(f"- {paradigm} standard training (`mean`): final report loss {_fmt(mean[0], mean[1], 3)} against "
                     f"{finals[best]:.3f} for the best row `{best}` (the oracle aside): "
                     + ("it stays above it by more than 2 SE (bias)." if above else "no bias shown at 2 SE."))
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
    """A paragraph computed from the runs: which row did best on the report half (the oracle aside), the best
    Dr row against the best baseline (paired, with its verdict), and which sources the best Dr row weighted."""
    key = lambda r: statistics.fmean(stats.final(s, "report", metric) for s in by_seed[(paradigm, r)].values())  # noqa
    rows = [r for (p, r) in by_seed if p == paradigm and r != "oracle"]
    if not rows:
        return f"No {paradigm} runs."
    best = (max if stats.higher_is_better(metric) else min)(rows, key=key)
    text = [f"On {paradigm}, the best row on the report half by {metric} was `{best}` ({key(best):.3f}"
            f"{'' if stats.kind_of(best) != 'dr' else ', a Dr method'})."]
    for c in stats.comparisons(by_seed, paradigm, metric):
        if c["against"] == "best baseline":
            p = c["paired"][metric]
            text.append(f"The best Dr row chosen on the select half, `{c['dr']}`, against the best baseline "
                        f"`{c['row']}`: {metric} {p['diff']:+.3f} ± {p['se']:.3f} (paired over {p['seeds']} seeds), "
                        f"so it is {c['verdict']}.")
            weights = source_weights(by_seed, paradigm, c["dr"])
            if weights:
                ranked = sorted(weights.items(), key=lambda kv: -kv[1])
                text.append(f"It weighted {ranked[0][0]} most ({ranked[0][1]:.2f}x the uniform weight) and "
                            f"{ranked[-1][0]} least ({ranked[-1][1]:.2f}x).")
    return " ".join(text)


def _mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float]]:
    steps = [e["step"] for e in runs[0]["evals"]]
    mean, se = zip(*(stats.mean_se([r["evals"][i][key] for r in runs]) for i in range(len(steps))))
    return steps, list(mean), [0.0 if not math.isfinite(x) else x for x in se]


def plot_curves(by_seed: dict, paradigms: list[str], start: dict, metric: str):
    """The figure of curves.png (returned, not saved)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(paradigms), figsize=(4.2 * len(paradigms), 6.4), squeeze=False)
    for col, paradigm in enumerate(paradigms):
        rows = [("target", "target-only", "C3"), ("mean", "standard (mean)", "C7"),
                (stats.best_row(by_seed, paradigm, "dr", metric), "best Dr", "C0"),
                (stats.best_row(by_seed, paradigm, "baseline", metric), "best baseline", "C1"),
                ("oracle", "oracle (2,000 target)", "k")]
        for r, key in enumerate(("report_loss", "report_accuracy")):
            ax = axes[r][col]
            for row, what, color in rows:
                runs = list(by_seed.get((paradigm, row), {}).values())
                if not runs:
                    continue
                steps, mean, se = _mean_curve(runs, key)
                steps, mean, se = [0] + steps, [start[key]] + mean, [0.0] + se
                ax.plot(steps, mean, color=color, ls="--" if row == "oracle" else "-", lw=1.4,
                        label=f"{what}: {row}" if what.startswith("best") else what)
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
            xs = [s["final"][key] for s in summaries if s["sweep"] == knob and dict(map(tuple, s["knobs"]))[knob] == v]
            if xs:
                pts.append((i, *stats.mean_se(xs), len(xs)))
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                    yerr=[p[2] if math.isfinite(p[2]) else 0.0 for p in pts], marker="o", capsize=3,
                    label=f"{method} ({pts[0][3] if pts else 0} seeds)")
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
            ax.plot(steps, vals, color=f"C{j}", lw=1.4, label=label)
        ax.axhline(1.0, color="gray", ls=":", lw=1)
        ax.set_title(f"{paradigm}: best {'Dr' if kind == 'dr' else 'baseline'} `{row}`", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("weight / uniform weight")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("mean weight of a general unit by source, relative to standard training's (1, dotted); "
                 "mean over seeds and each window of steps", fontsize=9)
    fig.tight_layout()
    return fig


def write_report(cfg, summaries: list[dict], start: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    metric = cfg.primary
    paradigms = [p for p in paradigms_of(cfg) if any(s["paradigm"] == p for s in summaries)]
    by_seed = stats.rows_by_seed(summaries, metric)
    rows = table_rows(by_seed)
    table = write_table(cfg.out, rows)
    import matplotlib.pyplot as plt

    figures = {"curves.png": plot_curves(by_seed, paradigms, start, metric),
               "spectrum.png": plot_spectrum(summaries, by_seed, metric),
               "weights.png": plot_weights(by_seed, paradigms, metric)}
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(os.path.join(cfg.out, name), dpi=110)
            plt.close(fig)
    wall = sum(s["wall_seconds"] for s in summaries)
    text = (f"# drpt reproduce --{cfg.mode}\n\n"
            f"Fixed before the runs: {cfg.seeds} seeds per row ({cfg.spectrum_seeds} per spectrum point), {cfg.steps} "
            f"steps of AdamW at lr {cfg.lr:g}, n = {cfg.n_general} general and m = {cfg.m_target} target units per "
            f"step, a target set of {cfg.target_size} (the oracle: {cfg.oracle_size} fresh), model {cfg.model}, "
            f"device {cfg.device}; primary metric: {metric}. Best rows and the early-stopping step are chosen on the "
            f"select half of the held-out target prompts; every number below is on the report half ({cfg.eval_n} "
            f"prompts each). ± is one standard error over seeds. Starting model: report accuracy "
            f"{start['report_accuracy']:.3f}, loss {start['report_loss']:.4f}. Runs: {len(summaries)}, "
            f"{wall / 60:.1f} worker-minutes.\n"
            "\n## Verdicts (paired by seed, report half)\n\n" + "\n".join(verdict_lines(by_seed, paradigms, metric))
            + "\n\n## Bias and variance (SFT)\n\n" + "\n".join(phenomenon_lines(by_seed, start))
            + "\n\n## Tables\n" + table + "\n")
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(text)
    return text
