"""drpt_ref: Data-Regularized Post-Training, the reference implementation.

At each step the target gradient g_T is projected onto a feasible set C of update directions
built from the per-sample gradients G of a general batch:

    d* = argmin_{d in C} 1/2 ||d - g_T||^2 = alpha g_T + G w

and every choice of C (target-only, standard training, mixing, a ball, hard top-k selection, the
capped simplex, the convex hull, softmax reweighting, the cone, the span) is a small convex
program in the sample weights w that needs only K = G^T G, b = G^T g_T and c = ||g_T||^2.

Symbols used in every shape comment:
    B  problems in a batch          n  general samples (columns of G)
    m  target samples               p  parameters
    T  tokens                       L  layers
    r  rank of the joint Gram of (g_T, G)

Entry points:
    project(K, b, c, method, **params)        exact solvers, or solver="cvxpy"
    project_batched(K, b, c, method, ...)     many problems at once, torch, any device
    cvxpy_program(K, b, c, method, **params)  the convex program that defines a method
    METHODS                                   method names and their parameters
"""

from drpt_ref.batched import project_batched
from drpt_ref.direction import Direction
from drpt_ref.methods import METHODS, NESTED_CHAIN
from drpt_ref.programs_cvxpy import cvxpy_program, solve_cvxpy
from drpt_ref.project import project

__all__ = ["Direction", "METHODS", "NESTED_CHAIN", "cvxpy_program", "project", "project_batched", "solve_cvxpy"]
