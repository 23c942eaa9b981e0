"""What notebooks 06-08 show: one paradigm of a reproduction, read from its folder or trained live.

    view = read_view("../results/reproduce_headline", "sft")     # the committed 5-seed run, as it was measured
    view = live_view("sft", "../runs/notebook_live_sft", small=False)  # the same regime trained here: 1 seed, the
                                                                  # paradigm's rows, no spectrum (minutes on a CPU)
    view.by_seed, view.start, view.metric, view.cfg               # what report.py's figures and story() take

Both go through the code of `drpt reproduce` (plan.py, run.py, stats.py), so a notebook shows exactly the
regime and the statistics of the results it cites, and its closing sentences are computed by report.story.

Shapes: no tensors here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from drpt_ref.experiments.reproduce import stats
from drpt_ref.experiments.reproduce.plan import ReproduceConfig


@dataclass
class View:
    cfg: ReproduceConfig  # the settings the runs were made with
    paradigm: str  # the paradigm shown
    summaries: list  # the run summaries of that paradigm (run.py)
    start: dict  # the starting model on both held-out halves
    by_seed: dict  # (paradigm, row) -> {seed: summary}, stats.rows_by_seed

    @property
    def metric(self) -> str:
        return self.cfg.primary


def _view(cfg: ReproduceConfig, paradigm: str, summaries: list, start: dict) -> View:
    mine = [s for s in summaries if s["paradigm"] == paradigm]
    if not mine:
        raise ValueError(f"{cfg.out!r} holds no {paradigm} runs; run `drpt reproduce --paradigms {paradigm}`.")
    return View(cfg, paradigm, mine, start, stats.rows_by_seed(mine, cfg.primary))


def read_view(folder: str, paradigm: str) -> View:
    """A finished reproduction's runs of one paradigm, from the files `drpt reproduce` wrote in `folder`."""
    paths = {name: os.path.join(folder, name) for name in ("reproduce_config.json", "summaries.json", "start.json")}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{folder!r} is not a finished reproduction ({missing[0]} is missing); run "
                                f"`drpt reproduce --out {folder}` first.")
    loaded = {}
    for name, path in paths.items():
        with open(path) as f:
            loaded[name] = json.load(f)
    cfg = ReproduceConfig(**loaded["reproduce_config.json"])
    return _view(cfg, paradigm, loaded["summaries.json"], loaded["start.json"])


def live_view(paradigm: str, out: str, small: bool = False, model: str = "../small_models/gpt2-tiny") -> View:
    """Train the paradigm's rows of the quick job (1 seed, no spectrum) into `out` and return them; `small`
    shrinks steps and evaluation for a look in seconds (not the regime: say so when you show it)."""
    from drpt_ref.experiments.reproduce.run import reproduce, start_eval

    cfg = ReproduceConfig(out=out, seeds=1, spectrum_seeds=0, paradigms=paradigm, model=model, progress=False,
                          overwrite=True)  # the notebook's own folder: its runs of other settings are replaced
    if small:
        cfg = dataclasses.replace(cfg, steps=6, eval_every=3, eval_n=20, retention_n=10, oracle_warmup=2)
    summaries = [s for s in reproduce(cfg) if not s["sweep"]]
    return _view(cfg, paradigm, summaries, start_eval(cfg))
