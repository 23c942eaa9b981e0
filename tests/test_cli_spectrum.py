"""`drpt spectrum` (the README's main command) runs, prints every method, and checks the nesting."""

import numpy as np

from drpt_ref.cli import main
from drpt_ref.core.methods import METHODS
from drpt_ref.experiments.spectrum.demo import SpectrumConfig, run_spectrum
from drpt_ref.experiments.spectrum.plot import knob_paths


def test_spectrum_command_prints_every_method(capsys, tmp_path):
    png = tmp_path / "spectrum.png"
    assert main(["spectrum", "--n", "8", "--p", "20", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in METHODS)
    assert "holds" in out and png.stat().st_size > 10_000


def test_spectrum_rows_agree_with_cvxpy():
    rows = run_spectrum(SpectrumConfig(n=12, p=40, family="duplicates", seed=1))
    assert all(r["value_gap"] <= 1e-7 * (1 + abs(r["objective"])) for r in rows)


def test_knob_paths_run_between_the_endpoints():
    """Every knob starts at the mean (relative objective 1); mix and ball end at the target (0)."""
    G = np.random.default_rng(0).standard_normal((30, 10))
    g = np.random.default_rng(1).standard_normal(30)
    paths = knob_paths(G.T @ G, G.T @ g, float(g @ g), points=7)
    for name, (_, rel) in paths.items():
        # softmax and ridge start at a large but finite knob (1e3 x spread(b), 1e4 x mean K_ii): w = 1/n + O(1/knob)
        soft = name.startswith(("softmax", "subspace"))
        assert abs(rel[0] - 1.0) < (1e-3 if soft else 1e-6), name
    assert paths["mix lam"][1][-1] == 0.0 and paths["ball radius"][1][-1] < 1e-12
