"""`drpt bench solvers`: the batched solver against the exact solver, cvxpy and qpth, in one table.

For each method and each (B, n) of a grid, on the same B random problems (all families of
drpt_ref.core.instances except n = 1, float64), it times

    batched   project_batched on the whole batch, eager (best of --repeat runs, after one warm-up)
    compiled  project_batched(compiled=True), the same (batched/compiled.py); its warm-up call compiles the
              kernels for the cell's shape and is not timed, its seconds are reported (compile s)
    exact     drpt_ref.core.project in a Python loop (stops after --loop-budget seconds, extrapolated to B)
    cvxpy     solve_cvxpy in a loop on --cvxpy-samples problems (Clarabel), extrapolated to B
    qpth      qpth.qp.QPFunction on the batch, if qpth is installed (QP methods only; qpth needs an SPD
              Q, so it gets Q = K + 1e-9 * mean(diag K) I, a ridge whose effect on the objective is
              <= 1e-9 * mean(diag K) / 2 for simplex weights and which the gap column includes)

and prints the ratios (the cvxpy loop against both batched figures, the others against the compiled one, or the
eager one with --eager-only) and the worst objective gap against cvxpy on the sampled problems, in units of
the acceptance tolerance (gap/tol = |f - f_cvxpy| / (1e-7 |f_cvxpy| + 1e-9); <= 1 passes).

Shapes: K (B, n, n), b (B, n), c (B,) per grid cell.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import time

import cvxpy
import numpy as np
import torch

from drpt_ref.batched.compiled import compiled_kernels, failed_kernels
from drpt_ref.batched.solve import project_batched
from drpt_ref.core.direction import program_value
from drpt_ref.core.instances import FAMILIES, random_params, random_problem
from drpt_ref.core.methods import METHODS
from drpt_ref.core.programs_cvxpy import solve_cvxpy
from drpt_ref.flags import write_output

QP_METHODS = ("simplex", "capped_simplex", "cone")
QPTH_RIDGE = 1e-9  # relative to mean(diag K): qpth factors Q and needs it SPD


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def add_arguments(parser):
    parser.add_argument("--device", default="cpu", help="torch device of the batched solver and qpth (cpu, cuda)")
    parser.add_argument("--quick", action="store_true", help="a small grid (16x32,64x128) and 3 cvxpy samples per cell")
    parser.add_argument("--out", default=None, help="also write the table as markdown to this file")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--grid", default=None,
                        help="comma-separated BxN cells, e.g. 16x32,64x128 (None: 16x32,64x128,256x64)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for every solver")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs of each batched solver, eager and compiled (the best is kept)")
    parser.add_argument("--cvxpy-samples", type=int, default=None,
                        help="problems solved by cvxpy per cell, extrapolated to B (None: 8, or 3 with --quick)")
    parser.add_argument("--loop-budget", type=float, default=1.0,
                        help="seconds per cell for the exact solver's loop, extrapolated to B")
    parser.add_argument("--eager-only", action="store_true",
                        help="skip project_batched(compiled=True), e.g. without a C++ compiler or to save the compile "
                             "seconds; the ratios then use the eager figure (off: both are timed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problems")


def make_cell(rng, method, B, n):
    families = [f for f in FAMILIES if f != "single"]
    problems = [random_problem(rng, families[i % len(families)], n=n) for i in range(B)]
    params = [random_params(rng, method, p) for p in problems]
    if method == "topk":  # a shared k makes the cell comparable across solvers
        params = [{"k": max(1, n // 4)} for _ in problems]
    elif method == "capped_simplex":
        params = [{"k": n / 4 + 0.5} for _ in problems]
    return problems, params


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_batched(problems, params, method, device, repeat, compiled=False):
    """Best of `repeat` timed calls after one warm-up; -> seconds, the last result, seconds of the warm-up call
    (for compiled=True it compiles what this shape needs, and what an earlier row of the cell compiled is reused)."""
    K = torch.tensor(np.stack([p.K for p in problems]), device=device)  # (B, n, n)
    b = torch.tensor(np.stack([p.b for p in problems]), device=device)  # (B, n)
    c = torch.tensor(np.array([p.c for p in problems]), device=device)  # (B,)
    tp = {k: torch.tensor([q[k] for q in params], device=device,
                          dtype=torch.long if method == "topk" else torch.float64) for k in (params[0] or {})}
    _sync(device)
    t0 = time.perf_counter()
    res = project_batched(K, b, c, method, compiled=compiled, **tp)  # warm-up (and compile), not timed
    _sync(device)
    warm = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        res = project_batched(K, b, c, method, compiled=compiled, **tp)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, res, warm


def time_loop(fn, count, budget):
    """Run fn(i) for i < count until `budget` seconds pass; return the extrapolated total and how many ran."""
    t0, done = time.perf_counter(), 0
    while done < count and (done == 0 or time.perf_counter() - t0 < budget):
        fn(done)
        done += 1
    return (time.perf_counter() - t0) / done * count, done


def run_qpth(problems, params, method, device):
    from qpth.qp import QPFunction

    K = torch.tensor(np.stack([p.K for p in problems]), device=device)  # (B, n, n)
    b = torch.tensor(np.stack([p.b for p in problems]), device=device)  # (B, n)
    B, n = b.shape
    eye = torch.eye(n, dtype=K.dtype, device=device)
    Q = K + QPTH_RIDGE * K.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye  # (B, n, n) SPD
    G, h = -eye.expand(B, n, n), torch.zeros(B, n, dtype=K.dtype, device=device)
    if method == "capped_simplex":
        cap = torch.tensor([1.0 / q["k"] for q in params], dtype=K.dtype, device=device)
        G, h = torch.cat([G, eye.expand(B, n, n)], 1), torch.cat([h, cap[:, None].expand(B, n)], 1)
    if method == "cone":
        A, beq = torch.empty(0, dtype=K.dtype, device=device), torch.empty(0, dtype=K.dtype, device=device)
    else:
        A, beq = torch.ones(B, 1, n, dtype=K.dtype, device=device), torch.ones(B, 1, dtype=K.dtype, device=device)
    _sync(device)
    t0 = time.perf_counter()
    w = QPFunction(verbose=-1, eps=1e-12, maxIter=50)(Q, -b, G, h, A, beq)  # (B, n)
    _sync(device)
    return time.perf_counter() - t0, w.detach().cpu().numpy()


def gap_over_tol(value, ref):
    return abs(value - ref) / (1e-7 * abs(ref) + 1e-9)


def bench_cell(rng, method, B, n, args, device, have_qpth):
    problems, params = make_cell(rng, method, B, n)
    t_batched, res, _ = time_batched(problems, params, method, device, args.repeat)
    t_comp, res_c, warm = (None, None, None) if args.eager_only else time_batched(problems, params, method, device,
                                                                               args.repeat, compiled=True)
    failed = [] if args.eager_only else failed_kernels(compiled_kernels(device))
    if failed:  # those kernels ran eager: the time is no compiled figure (the RuntimeWarning said why)
        t_comp, res_c, warm = None, None, None
    from drpt_ref.core.project import project

    t_exact, n_exact = time_loop(lambda i: project(problems[i].K, problems[i].b, problems[i].c, method, **params[i]),
                                 B, args.loop_budget)
    samples = min(B, args.cvxpy_samples)
    refs = []

    def one_cvxpy(i):
        p = problems[i]
        try:
            alpha, w, _ = solve_cvxpy(p.K, p.b, p.c, method, **params[i])
        except cvxpy.error.SolverError:  # the reference failed: no gap for this sample (its time still counts)
            refs.append(None)
            return
        refs.append(program_value(p.K, p.b, p.c, method, params[i], alpha, w))

    t0 = time.perf_counter()
    for i in range(samples):
        one_cvxpy(i)
    t_cvxpy = (time.perf_counter() - t0) / samples * B
    values = res.info["program_value"].cpu().numpy()
    ok = [i for i in range(samples) if refs[i] is not None]
    gap = max((gap_over_tol(values[i], refs[i]) for i in ok), default=float("nan"))
    gap_c = None if res_c is None else max((gap_over_tol(res_c.info["program_value"].cpu().numpy()[i], refs[i])
                                            for i in ok), default=float("nan"))
    row = dict(method=method, B=B, n=n, batched=t_batched, compiled=t_comp, compile_failed=failed, compile_s=warm,
               exact=t_exact, exact_runs=n_exact, cvxpy=t_cvxpy, cvxpy_runs=samples, gap=gap, gap_c=gap_c, qpth=None,
               qpth_gap=None)
    if have_qpth and method in QP_METHODS:
        t_q, w_q = run_qpth(problems, params, method, device)
        row["qpth"] = t_q
        row["qpth_gap"] = max(gap_over_tol(program_value(problems[i].K, problems[i].b, problems[i].c, method,
                                                         params[i], 0.0, w_q[i]), refs[i]) for i in ok)
    return row


def fmt_ms(t):
    return "-" if t is None else f"{1e3 * t:,.1f}"


def fmt_ratio(a, b):
    return "-" if a is None else f"{a / b:,.1f}x"


def fmt_gap(g):
    return "-" if g is None else f"{g:.2g}"


def render(rows, header_lines):
    cols = ["method", "B", "n", "batched ms", "compiled ms", "compile s", "exact loop ms", "cvxpy loop ms", "qpth ms",
            "cvxpy/batched", "cvxpy/compiled", "exact/best", "qpth/best", "gap/tol batched", "gap/tol compiled",
            "gap/tol qpth"]
    lines = header_lines + ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        best = r["batched"] if r["compiled"] is None else r["compiled"]  # the figure the other ratios use
        exact = fmt_ms(r["exact"]) + ("" if r["exact_runs"] == r["B"] else f" ({r['exact_runs']} run)")
        cvx = fmt_ms(r["cvxpy"]) + ("" if r["cvxpy_runs"] == r["B"] else f" ({r['cvxpy_runs']} run)")
        cells = [r["method"], str(r["B"]), str(r["n"]), fmt_ms(r["batched"]), fmt_ms(r["compiled"]),
                 "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}", exact, cvx, fmt_ms(r["qpth"]),
                 fmt_ratio(r["cvxpy"], r["batched"]),
                 "-" if r["compiled"] is None else fmt_ratio(r["cvxpy"], r["compiled"]),
                 fmt_ratio(r["exact"], best), fmt_ratio(r["qpth"], best), fmt_gap(r["gap"]), fmt_gap(r["gap_c"]),
                 fmt_gap(r["qpth_gap"])]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:  # the acceptance cell, stated in words
        if (r["method"], r["B"], r["n"]) == ("simplex", 64, 128):
            comp = r["compiled"] is not None
            best = r["compiled"] if comp else r["batched"]
            name = "compiled" if comp else (f"eager (compiling {', '.join(r['compile_failed'])} failed)"
                                            if r["compile_failed"] else "eager (--eager-only)")
            q = "qpth not run" if r["qpth"] is None else (
                f"{r['qpth'] / best:.1f}x faster than qpth (needs >= 5x; gap/tol "
                f"{fmt_gap(r['gap_c'] if comp else r['gap'])} vs qpth {fmt_gap(r['qpth_gap'])})")
            ratio = r["cvxpy"] / best
            eager_note = f" (eager batched {fmt_ms(r['batched'])} ms)" if comp else ""
            lines += ["", f"Acceptance cell, simplex B = 64, n = 128, float64, {name} solver: {fmt_ms(best)} ms for "
                      f"the batch{eager_note}; {q}; "
                      f"{ratio:.1f}x faster per problem than the cvxpy loop (eager {r['cvxpy'] / r['batched']:.1f}x). "
                      f"The issue asks >= 100x: {'MET' if ratio >= 100 else 'NOT met'}."]
    failed = sorted({name for r in rows for name in r["compile_failed"]})
    if failed:
        lines += ["", f"Compiled column empty: torch.compile of {', '.join(failed)} failed in this run (see the "
                  "RuntimeWarning), so those kernels ran eager; install a C++ compiler (g++) for Inductor."]
    lines += ["", "Loop times marked (m run) ran m problems and are extrapolated to B; gap/tol <= 1 meets the "
              "float64 acceptance bar (1e-7 relative + 1e-9 absolute) against cvxpy on the cvxpy-sampled problems. "
              "exact/best and qpth/best divide by the compiled time (the eager one with --eager-only); compile s is "
              "the untimed warm-up call of the compiled solver (it compiles the kernels of the cell's shape; kernels "
              "an earlier row of the same cell compiled are reused, and Inductor's on-disk cache may hold some)."]
    return "\n".join(lines)


def run(args) -> int:
    device = torch.device(args.device)  # checked by bench/command.py (run)
    counts = (("--repeat", args.repeat), ("--threads", args.threads), ("--cvxpy-samples", args.cvxpy_samples))
    for flag, value in counts:
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value} must be >= 1.")
    if not args.loop_budget > 0:
        raise ValueError(f"--loop-budget {args.loop_budget} must be > 0 (seconds).")
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}.")
        return 2
    default_grid = "16x32,64x128" if args.quick else "16x32,64x128,256x64"
    try:
        grid = [tuple(int(x) for x in cell.lower().split("x")) for cell in (args.grid or default_grid).split(",")]
    except ValueError:
        grid = []
    if not grid or any(len(cell) != 2 or min(cell) < 1 for cell in grid):
        raise ValueError(f"--grid {args.grid!r}: comma-separated BxN cells with B, N >= 1, e.g. 16x32,64x128.")
    if args.cvxpy_samples is None:
        args.cvxpy_samples = 3 if args.quick else 8
    have_qpth = importlib.util.find_spec("qpth") is not None
    rng = np.random.default_rng(args.seed)
    header = [
        "# drpt bench solvers",
        "",
        f"- date: {datetime.date.today().isoformat()}; device: {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        f"- machine: {cpu_name()}, {os.cpu_count()} CPU cores visible, "
        f"torch {torch.__version__} with {torch.get_num_threads()} thread(s), Python {platform.python_version()}",
        f"- float64; batched = project_batched (eager), compiled = project_batched(compiled=True) (best of "
        f"{args.repeat} each{', compiled not run: --eager-only' if args.eager_only else ''}); "
        "exact = drpt_ref.core.project in a loop; "
        f"cvxpy = solve_cvxpy (Clarabel) in a loop on {args.cvxpy_samples} problems per cell, extrapolated to B",
        "- qpth: " + ("installed; Q = K + 1e-9 mean(diag K) I (qpth needs an SPD Q), eps=1e-12, maxIter=50"
                      if have_qpth else "not installed (pip install qpth to add its column)"),
    ]
    load_start = os.getloadavg()[0]  # (1-minute) the machine may be shared: the ratios are within this run
    rows = []
    for B, n in grid:
        for method in methods:
            rows.append(bench_cell(rng, method, B, n, args, device, have_qpth))
            print(f"  done {method} B={B} n={n}", flush=True)
    header.append(f"- load average (1 minute) on the {os.cpu_count()} cores: {load_start:.2f} at the start, "
                  f"{os.getloadavg()[0]:.2f} at the end")
    table = render(rows, header)
    print(table)
    if args.out:
        write_output(args.out, table)
    return 0
