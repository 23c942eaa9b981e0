"""Checkpoints restore parameters and optimizer state exactly; the metrics log is cut back on resume."""

import torch

from drpt_ref.training.run_state import MetricsLog, load_checkpoint, read_metrics, save_checkpoint, step_generator


def _train(model, opt, steps, start=0):
    for step in range(start, steps):
        x = torch.randn(8, 4, generator=step_generator(0, step), dtype=torch.float64)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_resume_is_bitwise(tmp_path):
    """4 steps, checkpoint, 4 more == 8 steps straight, for AdamW and SGD with momentum."""
    for make_opt in (lambda p: torch.optim.AdamW(p, lr=1e-2), lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9)):
        torch.manual_seed(0)
        straight = torch.nn.Linear(4, 3).double()
        resumed = torch.nn.Linear(4, 3).double()
        resumed.load_state_dict(straight.state_dict())
        opt_a = make_opt(straight.parameters())
        _train(straight, opt_a, 8)
        opt_b = make_opt(resumed.parameters())
        _train(resumed, opt_b, 4)
        save_checkpoint(str(tmp_path), 4, resumed, opt_b)
        fresh = torch.nn.Linear(4, 3).double()  # a new process: new model, new optimizer
        opt_c = make_opt(fresh.parameters())
        assert load_checkpoint(str(tmp_path), fresh, opt_c) == 4
        _train(fresh, opt_c, 8, start=4)
        for a, b in zip(straight.parameters(), fresh.parameters()):
            assert torch.equal(a, b)


def test_metrics_cut_back_on_resume(tmp_path):
    log = MetricsLog(str(tmp_path))
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step)})
    MetricsLog(str(tmp_path), resume_step=3).write({"step": 4, "loss": -4.0})
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
    assert read_metrics(str(tmp_path))[-1]["loss"] == -4.0
