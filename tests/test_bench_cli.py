"""`drpt bench` dispatches to both benchmarks; a CUDA device is refused where there is none."""

import pytest
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


def test_bench_solvers_refuses_bad_counts_and_grids(capsys):
    """A bad value is refused before anything runs, with the flag named (exit 2): --repeat 0 used to print 'inf ms',
    --cvxpy-samples 0 to divide by zero, --grid 0x5 to fail inside numpy."""
    for flag, value in (("--repeat", "0"), ("--threads", "0"), ("--cvxpy-samples", "0"), ("--loop-budget", "-1"),
                        ("--grid", "0x5"), ("--grid", "4"), ("--grid", "ax8")):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "solvers", "--methods", "target", "--eager-only", flag, value])
        assert exit_.value.code == 2 and flag in capsys.readouterr().err, (flag, value)


def test_bench_solvers_does_not_call_eager_times_compiled(capsys, monkeypatch):
    """If torch.compile fails, the kernels run eager (batched/compiled.py): the table leaves the compiled column empty
    and says why, instead of printing eager times under 'compiled ms'."""
    import drpt_ref.batched.compiled as compiled

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler (test)")

    kern = compiled.compiled_kernels("cpu", backend=failing_backend)
    monkeypatch.setattr(compiled, "_CPU", kern)
    with pytest.warns(RuntimeWarning, match="torch.compile of .* failed"):
        assert main(["bench", "solvers", "--quick", "--methods", "simplex", "--grid", "4x8", "--cvxpy-samples",
                     "2"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| simplex | 4 | 8 |"))
    assert row.split("|")[5].strip() == "-"  # compiled ms
    assert "Compiled column empty: torch.compile of" in out and compiled.failed_kernels(kern)
