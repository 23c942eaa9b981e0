"""`drpt bench` dispatches to both benchmarks; a CUDA device is refused where there is none."""

import torch

from drpt_ref.cli import main


def test_bench_solvers_quick_table(capsys):
    assert main(["bench", "solvers", "--quick", "--methods", "simplex", "--grid", "4x8", "--cvxpy-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "| simplex | 4 | 8 |" in out and "cvxpy/batched" in out


def test_bench_refuses_missing_cuda(capsys):
    if torch.cuda.is_available():
        return
    assert main(["bench", "step", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out
