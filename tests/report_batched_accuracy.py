"""Print the accuracy table of theory/batched_solvers.md, section 5 (a report, not a test).

On the test bank of tests/batched_cases.py (the problems, parameters and cvxpy references of
tests/test_batched_vs_cvxpy.py) it solves every method in float64 and float32 with
`project_batched` and prints, per method, the worst float64 gap against cvxpy in units of the
acceptance bar (|f - f_ref| / (1e-7 |f_ref| + 1e-9)), the worst float64 infeasibility, and the worst
float32 error relative to the scale the float32 test uses. Run from the repository root:

    python tests/report_batched_accuracy.py            # every method (about 2 minutes)
    python tests/report_batched_accuracy.py simplex    # some methods
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from batched_cases import batched_bank, f32_scale  # noqa: E402
from conftest import OBJ_ATOL, OBJ_RTOL  # noqa: E402
from feasibility import violation  # noqa: E402

from drpt_ref import METHODS, project_batched  # noqa: E402
from drpt_ref.core.direction import program_value  # noqa: E402


def worst(method):
    gap64, feas64, err32, count = 0.0, 0.0, 0.0, 0
    for batch in batched_bank(method):
        for dtype in (torch.float64, torch.float32):
            K, b, c = batch.tensors(dtype)
            res = project_batched(K, b, c, method, **batch.param_tensors(method, dtype))
            for i, p in enumerate(batch.problems):
                alpha, w = float(res.alpha[i]), res.weights[i].double().numpy()
                mine = program_value(p.K, p.b, p.c, method, batch.params[i], alpha, w)
                ref = batch.ref_value[i]
                if dtype == torch.float64:
                    gap64 = max(gap64, abs(mine - ref) / (OBJ_RTOL * abs(ref) + OBJ_ATOL))
                    feas64 = max(feas64, violation(method, batch.params[i], alpha, w))
                    count += 1
                else:
                    err32 = max(err32, abs(mine - ref) / max(f32_scale(method, p, batch.params[i], ref), 1e-300))
    return count, gap64, feas64, err32


def main(methods):
    print("| method | problems | float64: worst gap/tol vs cvxpy | float64: worst infeasibility "
          "| float32: worst abs. error / scale |")
    print("|---|---|---|---|---|")
    for method in methods:
        count, gap64, feas64, err32 = worst(method)
        print(f"| {method} | {count} | {gap64:.2g} | {feas64:.1e} | {err32:.1e} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or sorted(METHODS))
