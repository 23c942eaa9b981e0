"""The projections of the method, one convex program each, and the exact solvers that check them.

The ladder's first two rungs: the catalogue of methods and their parameters (methods.py), the result
type and the input checks (direction.py), the convex program that defines each method, solved by
cvxpy (programs_cvxpy.py), and the exact solvers: closed forms (closed_forms.py), the capped-simplex /
simplex active-set QP (simplex_qp.py), cone and subspace (cone_subspace.py), behind one entry point
`project` (project.py). Random and degenerate test problems: instances.py.

May import: flags.
"""
