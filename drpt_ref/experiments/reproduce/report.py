"""The tables and plots of `drpt reproduce`: results by paradigm and method, learning curves, the spectrum.

    results.md / results.csv   per paradigm and method: held-out target accuracy and answer loss (mean, std
                               over seeds), general-task retention, seconds per step; then, per paradigm,
                               the best Dr method against the best baseline on both target metrics
    curves.png                 held-out target loss against step, mean over seeds
    spectrum.png               held-out target loss along each knob, standard training -> target-only

Dr methods are the projections that are neither endpoint (ball, topk, capped_simplex, simplex, softmax, cone,
subspace), globally and per layer; baselines are random, less, rds, adapt and adapt_softmax.

Shapes: no tensors here.
"""

from __future__ import annotations

import csv
import os
import statistics
from collections import defaultdict

DR = ("ball", "topk", "capped_simplex", "simplex", "softmax", "cone", "subspace")
BASELINE = ("random", "less", "rds", "adapt", "adapt_softmax")


def _label(s: dict) -> str:
    return s["method"] + ("-pl" if s["per_layer"] else "")


def _mean_std(xs):
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table_rows(summaries: list[dict]) -> list[dict]:
    """One row per (paradigm, method label) of the main table, aggregated over seeds."""
    groups = defaultdict(list)
    for s in summaries:
        if not s["sweep"]:
            groups[(s["paradigm"], _label(s))].append(s)
    rows = []
    for (paradigm, label), runs in groups.items():
        acc, loss = _mean_std([r["target_accuracy"] for r in runs]), _mean_std([r["target_loss"] for r in runs])
        kind = "dr" if label.split("-")[0] in DR else "baseline" if label in BASELINE else "endpoint"
        rows.append({"paradigm": paradigm, "method": label, "kind": kind, "seeds": len(runs),
                     "acc_mean": acc[0], "acc_std": acc[1], "loss_mean": loss[0], "loss_std": loss[1],
                     "retention": statistics.fmean(r["retention"] for r in runs),
                     "sec_per_step": statistics.fmean(r["seconds_per_step"] for r in runs)})
    return rows


def comparison(rows: list[dict]) -> list[str]:
    """Per paradigm: the best Dr method against the best baseline, on accuracy and on loss, stated plainly."""
    lines = []
    for paradigm in dict.fromkeys(r["paradigm"] for r in rows):
        dr = [r for r in rows if r["paradigm"] == paradigm and r["kind"] == "dr"]
        base = [r for r in rows if r["paradigm"] == paradigm and r["kind"] == "baseline"]
        if not dr or not base:
            continue
        for metric, better, name in (("acc_mean", max, "accuracy"), ("loss_mean", min, "answer loss")):
            d, b = better(dr, key=lambda r: r[metric]), better(base, key=lambda r: r[metric])
            ok = d[metric] >= b[metric] if better is max else d[metric] <= b[metric]
            verdict = "at least as good" if ok else "WORSE"
            lines.append(f"- {paradigm}, held-out target {name}: best Dr `{d['method']}` {d[metric]:.4f} vs best "
                         f"baseline `{b['method']}` {b[metric]:.4f}: the Dr method is {verdict}.")
    return lines


def write_table(out: str, rows: list[dict]) -> str:
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| paradigm | method | kind | seeds | target acc | target loss | retention | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['paradigm']} | {r['method']} | {r['kind']} | {r['seeds']} | "
                     f"{r['acc_mean']:.3f} ± {r['acc_std']:.3f} | {r['loss_mean']:.4f} ± {r['loss_std']:.4f} | "
                     f"{r['retention']:.3f} | {r['sec_per_step']:.3f} |")
    return "\n".join(lines)


def plot_curves(out: str, summaries: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paradigms = list(dict.fromkeys(s["paradigm"] for s in summaries))
    fig, axes = plt.subplots(1, len(paradigms), figsize=(4.5 * len(paradigms), 3.8), squeeze=False)
    for ax, paradigm in zip(axes[0], paradigms):
        curves = defaultdict(list)
        for s in summaries:
            if s["paradigm"] == paradigm and not s["sweep"]:
                curves[_label(s)].append(s["curve"])
        for label, cs in sorted(curves.items()):
            steps = [p[0] for p in cs[0]]
            loss = [statistics.fmean(c[i][1] for c in cs) for i in range(len(steps))]
            style = "-" if label.split("-")[0] in DR else "--" if label in BASELINE else ":"
            ax.plot(steps, loss, style, label=label, lw=1.2)
        ax.set_title(paradigm)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out target answer loss")
    axes[0][-1].legend(fontsize=6, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(fig)


def plot_spectrum(out: str, summaries: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from drpt_ref.experiments.reproduce.plan import SPECTRUM, knob_default

    fig, axes = plt.subplots(1, len(SPECTRUM), figsize=(4.2 * len(SPECTRUM), 3.6), squeeze=False)
    ends = {m: [s["target_loss"] for s in summaries if s["paradigm"] == "sft" and s["method"] == m
                and not s["sweep"] and not s["per_layer"]] for m in ("target", "mean")}
    for ax, (knob, (method, values)) in zip(axes[0], SPECTRUM.items()):
        for paradigm in dict.fromkeys(s["paradigm"] for s in summaries if s["sweep"] == knob):
            pts = []
            for i, v in enumerate(values):
                ls = [s["target_loss"] for s in summaries if s["paradigm"] == paradigm and (
                    (s["sweep"] == knob and dict(map(tuple, s["knobs"]))[knob] == v)  # a sweep run
                    or (v == knob_default(knob) and not s["sweep"] and s["method"] == method
                        and not s["per_layer"]))]  # the default value: the main-table run
                if ls:
                    pts.append((i / (len(values) - 1), statistics.fmean(ls), statistics.pstdev(ls)))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=f"{paradigm}: {method}")
        for m, style in (("mean", "--"), ("target", ":")):
            if ends[m]:
                ax.axhline(statistics.fmean(ends[m]), color="gray", ls=style, label=f"sft {m}")
        ax.set_xticks([0, 1], ["standard", "target-only"])
        ax.set_title(f"{knob}: {', '.join(f'{v:g}' for v in values)}", fontsize=8)
        ax.set_ylabel("held-out target answer loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "spectrum.png"), dpi=110)
    plt.close(fig)


def write_report(cfg, summaries: list[dict]) -> str:
    from drpt_ref.experiments.reproduce.plan import RETENTION_TASKS

    rows = table_rows(summaries)
    table = write_table(cfg.out, rows)
    lines = comparison(rows)
    plot_curves(cfg.out, summaries)
    plot_spectrum(cfg.out, summaries)
    text = (f"# drpt reproduce --{cfg.mode}\n\n{cfg.seeds} seeds, {cfg.steps} steps, n = {cfg.n_general} general and "
            f"m = {cfg.m_target} target units per step, model {cfg.model}, device {cfg.device}. Held-out target "
            f"metrics on {cfg.eval_n} eval-split prompts; retention = mean accuracy on "
            f"{', '.join(RETENTION_TASKS)}.\n\n"
            + table + "\n\n## Best Dr method against the best baseline\n\n" + "\n".join(lines) + "\n")
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write(text)
    return text

