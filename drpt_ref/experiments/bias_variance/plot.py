"""The bias-variance spectrum as a table (CSV + markdown) and a picture, from `bias_variance.measure` rows.

The picture has one panel for the nested chain (mean -> capped simplex -> simplex -> cone -> subspace
-> target, categorical x) and one per knob path (x = the knob position, 0 = standard training, 1 = the
weak end); each panel shows bias^2, variance and their sum, all relative to ||g*||^2, with standard
training (x = 0) and target-only training (x = 1) marked on every knob panel
(theory/bias_variance.md, eqs. (1)-(3)).

Shapes: rows are dicts with path, position, method, knob, bias2, variance, mse, mc_floor, converged.
"""

from __future__ import annotations

import csv
import dataclasses

from drpt_ref.experiments.bias_variance.measure import KNOB_PATHS

COLUMNS = ("path", "position", "method", "knob", "bias2", "variance", "mse", "dist2", "mc_floor", "converged")


def write_tables(rows: list[dict], stem: str, about=None) -> str:
    """Write stem.csv and stem.md; return the markdown."""
    with open(stem + ".csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in COLUMNS})
    lines = ["# Measured bias and variance across the spectrum", ""]
    if about is not None:
        cfg = dataclasses.asdict(about) if dataclasses.is_dataclass(about) else dict(about)
        lines += ["Setting: " + ", ".join(f"{k}={v}" for k, v in cfg.items()), ""]
    lines += ["bias^2 = ||E_r d - g*||^2, variance = E_r ||d - E_r d||^2, mse = their sum, all divided by "
              "||g*||^2, conditional on the general batch G and averaged over the G draws; "
              "dist^2 = ||P_C(g*) - g*||^2 is the bias of projecting the noise-free g* (the set's approximation "
              "error, eq. (4)); mc_floor = variance / R is the part of the plug-in bias^2 that finite resampling "
              "alone produces (theory/bias_variance.md).",
              "", "| path | position | method | knob | bias^2 | variance | mse | dist^2 | mc floor | converged |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['position']:.3g} | {r['method']} | {r['knob']} | {r['bias2']:.4f} | "
                     f"{r['variance']:.4f} | {r['mse']:.4f} | {r['dist2']:.4f} | {r['mc_floor']:.1e} | "
                     f"{r['converged']} |")
    text = "\n".join(lines) + "\n"
    with open(stem + ".md", "w") as fh:
        fh.write(text)
    return text


def read_rows(path: str) -> list[dict]:
    """Rows back from a table written by write_tables (to re-plot without re-measuring)."""
    with open(path, newline="") as fh:
        return [{k: (v if k in ("path", "method", "knob") else v == "True" if k == "converged" else float(v))
                 for k, v in r.items()} for r in csv.DictReader(fh)]


def _curves(ax, xs, rows):
    ax.set_yscale("symlog", linthresh=0.1)  # linear below 0.1, logarithmic above: both ends stay readable
    ax.plot(xs, [r["bias2"] for r in rows], "o-", color="C0", label="bias$^2$")
    ax.plot(xs, [r["variance"] for r in rows], "s--", color="C3", label="variance")
    ax.plot(xs, [r["mse"] for r in rows], ":", color="gray", label="bias$^2$ + variance")
    ax.plot(xs, [r["dist2"] for r in rows], "-", color="C0", alpha=0.35, lw=3, label="dist$(g^*, C)^2$")


def plot_rows(rows: list[dict], path: str, title: str = "") -> None:
    """Write the figure to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chain = sorted((r for r in rows if r["path"] == "chain"), key=lambda r: r["position"])
    ends = {r["method"]: r for r in chain if r["method"] in ("mean", "target")}
    paths = [p for p in KNOB_PATHS if any(r["path"] == p for r in rows)]
    cols = 3
    nrows = -(-(1 + len(paths)) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    axes = axes.reshape(1, -1)
    for ax in axes[0, 1 + len(paths):]:
        ax.axis("off")
    ax = axes[0, 0]
    _curves(ax, range(len(chain)), chain)
    ax.set_xticks(range(len(chain)))
    ax.set_xticklabels([r["method"].replace("capped_simplex", "capped") for r in chain], rotation=35, fontsize=8)
    ax.set_title("nested chain (set grows ->)", fontsize=10)
    ax.set_ylabel("relative to $||g^*||^2$")
    ax.legend(fontsize=7)
    for ax, name in zip(axes[0, 1:], paths):
        sub = sorted((r for r in rows if r["path"] == name), key=lambda r: r["position"])
        _curves(ax, [r["position"] for r in sub], sub)
        for x, key, marker in ((0.0, "mean", "v"), (1.0, "target", "^")):
            if key in ends:  # standard training and target-only at the two ends
                ax.plot([x], [ends[key]["bias2"]], marker, color="C0", ms=9, mfc="none")
                ax.plot([x], [ends[key]["variance"]], marker, color="C3", ms=9, mfc="none")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("knob: standard (0) -> weak end (1)", fontsize=8)
    fig.suptitle(title + "   (open markers: standard training at 0, target-only at 1)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

