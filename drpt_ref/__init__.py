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

Layout, one subpackage per layer; imports run only downward (each __init__ says what it may import):
    flags        command-line flags shared by every command (config dataclass -> argparse, checks)
    deferred     device-side checks read on the host once, with the Dr step's record
    core         the projections of the method, one convex program each, and the exact solvers that check them
    batched      many projections at once in torch, on any device: the third rung of the solver ladder
    data         the task suite, its character tokenizer, and the sampling of completions (rollouts)
    losses       per-unit losses: the unit batch, SFT, DPO, GRPO and the unified policy-gradient estimator
    gram         the Gram quantities K, b, c of a model's per-unit gradients: exact, ghost and sketched engines
    distributed  data-parallel Dr steps over torch.distributed: the global K, b, c across ranks and the update reduced
    training     the Dr step and the training loop: weight rules, selection baselines, ADAPT, HPT, run state
    experiments  the jobs built on training: reproduce, bias-variance, spectrum, benchmarks, build-model
    integrations the Dr step inside TRL's trainers: DrSFTTrainer and DrDPOTrainer (optional extra `trl`)
    cli          `drpt`, one subcommand per job

Entry points:
    project(K, b, c, method, **params)        exact solvers, or solver="cvxpy"
    project_batched(K, b, c, method, ...)     many problems at once, torch, any device
    cvxpy_program(K, b, c, method, **params)  the convex program that defines a method
    METHODS                                   method names and their parameters
"""

from drpt_ref.batched.solve import project_batched
from drpt_ref.core.direction import Direction
from drpt_ref.core.methods import METHODS, NESTED_CHAIN
from drpt_ref.core.programs_cvxpy import cvxpy_program, solve_cvxpy
from drpt_ref.core.project import project

__all__ = ["Direction", "METHODS", "NESTED_CHAIN", "cvxpy_program", "project", "project_batched", "solve_cvxpy"]
