"""`drpt bench step --quick` on tests/tiny_lm.py's model: the table has every phase, method and Gram engine, and
positive ratios. No timing assertions: speed is what the benchmark prints, never what a test asserts."""

import pytest
from tiny_lm import write_tiny_model

from drpt_ref.cli import main
from drpt_ref.core.methods import METHODS


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    model = write_tiny_model(folder / "model")
    out = folder / "bench_step.md"
    assert main(["bench", "step", "--quick", "--repeat", "1", "--model", model, "--out", str(out)]) == 0
    return out.read_text()


def _rows(text: str, first_col: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_col} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_every_phase_method_and_engine(table):
    header = next(line for line in table.splitlines() if line.startswith("| n | T | m | method |"))
    for col in ("fwd+bwd ms", "gram ms", "solve ms", "update ms", "total ms", "ratio to standard", "peak MB"):
        assert col in header
    rows = _rows(table, "n | T | m | method")
    cells = {(r[0], r[1], r[2]) for r in rows}
    assert len(cells) == 2  # the quick grid
    for cell in cells:
        configs = {(r[3], r[4]) for r in rows if (r[0], r[1], r[2]) == cell}
        assert ("standard", "-") in configs
        assert {(m, "ghost") for m in METHODS} <= configs
        assert {("simplex", "ghost-mat"), ("simplex", "exact"), ("simplex", "sketch")} <= configs
    for r in rows:
        assert all(float(x.replace(",", "")) >= 0 for x in r[5:10])
        assert float(r[10].rstrip("x")) > 0
        assert float(r[11]) >= 0 or r[11] == "nan"
    # the untimed memory pass sees the step's tensors (freed host blocks are returned first, not reused unseen)
    assert max(float(r[11]) for r in rows if r[4] == "exact") > 0
    assert "no GPU in this run" in table


def test_summary_and_crossover(table):
    summary = _rows(table, "n | T | m | ghost")
    assert len(summary) == 2 and all(float(c.split("x")[0]) > 0 for r in summary for c in r[3:7])
    cross = _rows(table, "n | T | pair ms")
    assert [int(r[1]) for r in cross] == [8, 16, 32]
    assert all(r[5] in ("pair", "materialize") and float(r[4]) > 0 for r in cross)


def test_bench_solvers_still_dispatches(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "solvers", "--help"])
    assert exit_info.value.code == 0
    assert "--cvxpy-samples" in capsys.readouterr().out


def test_bad_grid(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # the CLI prints usage and the message, no traceback
        main(["bench", "step", "--grid", "4by16", "--model", write_tiny_model(tmp_path / "m")])
    assert exit_info.value.code == 2 and "--grid" in capsys.readouterr().err


@pytest.mark.parametrize("what, flag", [("step", "--threads"), ("step", "--repeat"), ("step", "--sketch-dim"),
                                        ("comm", "--threads"), ("comm", "--repeat")])
def test_counts_below_one_are_refused(tmp_path, capsys, what, flag):
    with pytest.raises(SystemExit) as exit_info:  # refused before any model is built or process started
        main(["bench", what, flag, "0", "--model", write_tiny_model(tmp_path / "m")])
    assert exit_info.value.code == 2 and f"{flag} 0: must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["simplx", "mean"])
def test_compiled_methods_must_be_qps(tmp_path, capsys, method):
    with pytest.raises(SystemExit) as exit_info:  # refused before anything is compiled: unknown, or no QP to compile
        main(["bench", "step", "--compiled-methods", method, "--model", write_tiny_model(tmp_path / "m")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--compiled-methods" in err and method in err


def test_compiled_rows_say_when_the_compile_failed(tmp_path, monkeypatch):
    """If torch.compile fails the kernels run eager (batched/compiled.py): the rows must not say compiled."""
    import drpt_ref.batched.compiled as compiled

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler (test)")

    kern = compiled.compiled_kernels("cpu", backend=failing_backend)
    monkeypatch.setattr(compiled, "_CPU", kern)
    out = tmp_path / "bench.md"
    with pytest.warns(RuntimeWarning, match="torch.compile of .* failed"):
        assert main(["bench", "step", "--grid", "4x8", "--crossover", "4x8", "--methods", "capped_simplex",
                     "--compiled-methods", "capped_simplex", "--gram-methods", "", "--repeat", "1", "--model",
                     write_tiny_model(tmp_path / "m"), "--out", str(out)]) == 0
    text = out.read_text()
    methods = {r[3] for r in _rows(text, "n | T | m | method")}
    assert "capped_simplex (compile failed: eager)" in methods and "capped_simplex (compiled)" not in methods
    failed = next(line for line in text.splitlines() if line.startswith("- torch.compile failed for "))
    assert "solve_qp sync-free (capped simplex)" in failed
