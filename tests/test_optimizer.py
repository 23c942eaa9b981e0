"""make_optimizer: fused AdamW where torch has the kernel, and the same steps as torch's foreach AdamW (the
reference implementation of the same update); SGD unchanged; clear errors."""

import pytest
import torch

from drpt_ref.training.optimizer import as_grad, fused_supported, make_optimizer


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in ((7, 5), (5,), (3, 4, 2))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fused_adamw_steps_as_foreach_adamw(dtype):
    fused, reference, start = _params(dtype), _params(dtype), _params(dtype)
    opt = make_optimizer("adamw", fused, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1, foreach=True)
    assert opt.param_groups[0]["fused"] and not ref.param_groups[0]["fused"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(fused, reference):
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    # float32 / float64: the same update up to round-off (an ulp in a few element-steps of a thousand); bfloat16: a few
    # ulps (2**-8 relative), as the fused kernel keeps its intermediates in float32 where foreach rounds each operation
    tol = {torch.bfloat16: 2e-2}.get(dtype, 1e-6)
    for p, q in zip(fused, reference):
        assert (p.detach().double() - q.detach().double()).abs().max() <= tol * q.detach().double().abs().max()
    assert all(not torch.equal(p.detach(), s.detach()) for p, s in zip(fused, start))  # the steps moved them


def test_fused_needs_floating_cpu_or_cuda_parameters():
    assert fused_supported(_params(torch.float32)) and not fused_supported([])
    assert not fused_supported([torch.zeros(3, dtype=torch.long)])
    assert not fused_supported([torch.zeros(3, device="meta")])
    strided = torch.nn.Parameter(torch.zeros(4, 8)[:, ::2])  # a slice: the fused step is wrong on it, foreach is not
    assert not strided.is_contiguous() and not fused_supported([strided])
    assert not make_optimizer("adamw", [strided], lr=0.1).param_groups[0]["fused"]


def test_sgd_and_errors():
    params = _params(torch.float32)
    opt = make_optimizer("sgd", params, lr=0.5)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.5
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(torch.equal(p.detach(), b - 0.5) for p, b in zip(params, before))
    with pytest.raises(ValueError, match="optimizer 'adam' is unknown"):
        make_optimizer("adam", params, lr=0.1)
    with pytest.raises(ValueError, match="no parameters"):
        make_optimizer("adamw", [], lr=0.1)


def test_as_grad_lays_out_the_gradient_as_its_parameter():
    """A transposed update (what assemble_update once returned for nn.Linear) becomes a gradient with the parameter's
    strides, so that the fused AdamW step equals the foreach step taken on the transposed update itself."""
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(6, 4, generator=gen)
    d = torch.randn(4, 6, generator=gen).T  # (6, 4), strides (1, 6): a transposed view
    fused, reference = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    g = as_grad(fused, d.double())
    assert g.stride() == fused.stride() and g.dtype == fused.dtype and torch.equal(g, d)
    assert as_grad(fused, g) is g  # already laid out: no copy
    fused.grad, reference.grad = g, d
    make_optimizer("adamw", [fused], lr=0.1).step()
    torch.optim.AdamW([reference], lr=0.1, weight_decay=0.0, foreach=True).step()
    assert torch.allclose(fused.detach(), reference.detach(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        as_grad(fused, d.T)
