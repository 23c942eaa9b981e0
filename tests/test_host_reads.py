"""Host reads inside one Dr step (issue 18): at most one, by drpt_ref's own code; and what that one read keeps.

A host read (.item, .tolist, .cpu, .numpy, bool / float / int / index of a tensor, a tensor in an `if`) waits on a GPU
for every queued kernel. `count_reads` patches those torch.Tensor methods for one call of dr_step on a tiny random
GPT-2 and attributes each read to the innermost frame of drpt_ref, transformers or torch.optim. The step runs with the
optimizer drpt train uses (training/optimizer.py: fused AdamW, which keeps its step counters on the device and reads
nothing; torch's default foreach AdamW reads one per parameter). Only one read outside drpt_ref is allowed, named:
transformers' attention-mask code reads whether the padding mask is all ones. Any other read, or more than one by
drpt_ref, fails. Then: a failed deferred check still raises before anything is written;
the sync-free solver agrees with the synchronising one where it certifies; a miss falls back to the full solve.
"""

import collections
import contextlib
import copy
import traceback

import numpy as np
import pytest
import torch
from conftest import obj_tol
from tiny_lm import write_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from drpt_ref.batched import qp
from drpt_ref.batched import solve as solve_module
from drpt_ref.batched.solve import project_batched
from drpt_ref.core.instances import random_problem
from drpt_ref.core.methods import METHODS
from drpt_ref.data.tasks import TARGET, general_pool, get_task
from drpt_ref.deferred import deferred, read, require
from drpt_ref.losses.unit_batch import RowBatch
from drpt_ref.training.dr_step import Knobs, dr_step, freeze_uncovered
from drpt_ref.training.optimizer import make_optimizer
from drpt_ref.training.train import TrainConfig, make_batches, unit_loss_of

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
OWNERS = ("drpt_ref", "transformers", "torch/optim")
ALLOWED_OUTSIDE = {("transformers", "masking_utils.py")}


@contextlib.contextmanager
def count_reads():
    """Yields a list that fills with (owner, file, line, method) for every host read in the block."""
    log, originals = [], {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            owner = ("other", "?", 0)
            for frame in reversed(traceback.extract_stack()[:-1]):  # innermost first
                hit = next((o for o in OWNERS if f"/{o}/" in frame.filename.replace("\\", "/")), None)
                if hit:
                    owner = (hit, frame.filename.rsplit("/", 1)[-1], frame.lineno)
                    break
            log.append((*owner, name))
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def _batches(paradigm, tok, model, n=6, m=3):
    cfg = TrainConfig(paradigm=paradigm, n_general=n, m_target=m, group_size=3, reward="partial")
    target_set = getattr(get_task(TARGET), paradigm)(16, 0, "train")
    ref = copy.deepcopy(model).requires_grad_(False)
    general, target, _ = make_batches(cfg, 1, tok, model, ref, target_set, general_pool(200, 0, "train", paradigm))
    return unit_loss_of(cfg), general, target


def _step_reads(tiny, paradigm, method, per_layer, **knobs):
    tok, model = tiny
    model = copy.deepcopy(model)
    loss_fn, general, target = _batches(paradigm, tok, model)
    opt = make_optimizer("adamw", freeze_uncovered(model), lr=1e-4)  # the optimizer drpt train steps with
    dr_step(model, opt, loss_fn, general, target, method, Knobs(**knobs), per_layer=per_layer)  # optimizer state made
    with count_reads() as log:
        rec = dr_step(model, opt, loss_fn, general, target, method, Knobs(**knobs), per_layer=per_layer)
    return rec, log


def _check(log):
    ours = [r for r in log if r[0] == "drpt_ref"]
    others = collections.Counter((r[0], r[1]) for r in log if r[0] != "drpt_ref")
    assert len(ours) <= 1, f"{len(ours)} host reads by drpt_ref in one step: {ours}"
    assert set(others) <= ALLOWED_OUTSIDE, f"host reads outside drpt_ref's allowed ones: {others}"
    return ours


@pytest.mark.parametrize("paradigm", ["sft", "dpo", "grpo"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_one_host_read_per_step(tiny, paradigm, per_layer):
    rec, log = _step_reads(tiny, paradigm, "capped_simplex", per_layer, k=2.0)
    assert len(_check(log)) == 1 and rec["converged"]
    assert any(r[0] == "drpt_ref" and r[1] == "deferred.py" for r in log)  # the one read is the record's


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"capped_simplex"}))
def test_one_host_read_every_method(tiny, method):
    rec, log = _step_reads(tiny, "sft", method, False)
    _check(log)
    assert rec["converged"] and np.isfinite(rec["objective"]).all()


def test_the_counter_sees_reads():
    """The counter itself: every kind of read is seen and attributed (a counter that sees nothing passes anything)."""
    x = torch.ones(3)
    with count_reads() as log:
        x.sum().item(), x.tolist(), x.cpu(), x.numpy(), bool(x[0]), float(x[0]), int(x[0])
        if x[1]:
            pass
    assert [r[3] for r in log] == ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__bool__"]


def test_a_failed_check_raises_before_the_update(tiny):
    """A unit without answer tokens is refused at the step's one read, before any parameter moves."""
    tok, model = tiny
    model = copy.deepcopy(model)
    loss_fn, general, target = _batches("sft", tok, model)
    mask = general.loss_mask.clone()
    mask[0] = 0
    bad = RowBatch(general.input_ids, general.attention_mask, mask, general.rows_per_unit, general.extras)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(freeze_uncovered(model), lr=1e-2)
    with pytest.raises(ValueError, match="no answer tokens"):
        dr_step(model, opt, loss_fn, bad, target, "capped_simplex", Knobs(k=2.0))
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())


def test_deferred_scope_order_values_and_exit():
    with deferred():
        require(torch.tensor([True, True]), "never")
        require(torch.tensor(False), "first")
        require(torch.tensor(False), lambda: "second")
        with pytest.raises(ValueError, match="^first$"):
            read(torch.arange(3))
    with deferred():
        assert read(torch.tensor([[1.5, 2.0]]), torch.tensor([True, False])) == [[1.5, 2.0], [1.0, 0.0]]
        with pytest.raises(ValueError, match="now"):  # after the read, a check reads at once
            require(torch.tensor(False), "now")
    with pytest.raises(ValueError, match="unread"):  # left with a check never read: read on exit
        with deferred():
            require(torch.tensor(False), "unread")


@pytest.mark.parametrize("method", ["simplex", "capped_simplex", "cone", "subspace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sync_free_solver_agrees_where_it_certifies(method, dtype):
    """project_batched(sync_free=True): certified answers (on K, b, c as given) match the synchronising solver's
    objective; most random problems certify in the fixed schedule."""
    rng = np.random.default_rng(7)
    probs = [random_problem(rng, "gaussian", n=12) for _ in range(24)]
    K = torch.tensor(np.stack([p.K for p in probs]), dtype=dtype)
    b = torch.tensor(np.stack([p.b for p in probs]), dtype=dtype)
    c = torch.tensor([p.c for p in probs], dtype=dtype)
    params = {"k": 3.0} if method == "capped_simplex" else {"ridge": 0.1} if method == "subspace" else {}
    fast = project_batched(K, b, c, method, sync_free=True, **params)
    full = project_batched(K, b, c, method, **params)
    ok = fast.info["converged"]
    assert ok.float().mean() >= 0.75, f"only {int(ok.sum())} of {len(ok)} certified by the sync-free schedule"
    scale = 1e3 if dtype == torch.float32 else 1.0  # float32 answers carry float32's round-off
    for i in ok.nonzero().flatten().tolist():
        ref = float(full.objective[i])
        assert abs(float(fast.objective[i]) - ref) <= scale * obj_tol(ref) + scale * 1e-9 * float(c[i]), i


def test_a_miss_falls_back_to_the_full_solve(tiny, monkeypatch):
    """With a schedule too short to certify (no polish, two iterations), the step re-solves with the synchronising
    solver: its record is the full solve's, converged."""
    monkeypatch.setattr(qp, "SYNC_FREE_POLISH_STEPS", 0)
    short = qp.solve_qp

    def two_iterations(*args, **kwargs):
        return short(*args, **kwargs, first_check=2) if kwargs.get("sync_free") else short(*args, **kwargs)

    monkeypatch.setattr(solve_module, "solve_qp", two_iterations)
    rec, log = _step_reads(tiny, "sft", "capped_simplex", False, k=2.0)
    assert rec["converged"]
    assert sum(r[0] == "drpt_ref" and r[1] == "deferred.py" for r in log) == 2  # the record, read again
