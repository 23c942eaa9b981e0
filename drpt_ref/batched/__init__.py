"""Many projections at once in torch, on any device: the third rung of the solver ladder.

`project_batched` (solve.py) checks the inputs (checks.py), runs the accelerated projected-gradient
QP (qp.py) with the Euclidean projections onto each set (projections.py) and the active-face polish
(polish.py), and certifies every problem against its program as `core` defines it.

May import: flags, deferred, core.
"""
