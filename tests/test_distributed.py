"""The Dr step under torch.distributed (issue 17): gloo on CPU, 2 and 3 processes started as torchrun starts them
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

- After 5 AdamW steps of SFT, DPO and GRPO, global and per layer, with the ghost, exact and sketch Grams (every
  combination: 18 runs per world size, the gathered form per layer cycling through auto, tokens and units), the
  parameters of every rank are bitwise equal, and equal within 1e-6 (float64) to one process stepping on the union
  of the ranks' batches, run in the same process as rank 0 after the group is destroyed (the same batches, the
  same threads). Shares are unequal (n = 5, m = 3 over 2 or 3 ranks) and GRPO's groups stay whole.
- The bytes in each step's `comm` record are eq. (4) of theory/distributed.md computed from the model's layers.
- A DDP-wrapped model, a DTensor parameter and a weight rule are refused with a message; too few units per rank too.
- `drpt train` on 2 processes ends where one process ends (within 1e-6), and only rank 0 writes the run folder.

Run as a script, this file is the worker of one rank (`python tests/test_distributed.py worker MODEL OUT`).
"""

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_lm import final_params, train_argv, write_tiny_model

from drpt_ref.distributed.ranks import check_model, check_shares, local_units, share
from drpt_ref.training.dr_step import Knobs, dr_step, freeze_uncovered

PARADIGMS = ("sft", "dpo", "grpo")
GRAMS = ("ghost", "exact", "sketch")
STEPS, N, M = 5, 5, 3
TOL = 1e-6  # the bar (float64); the runs differ only by the order of sums: ~1e-15 per step
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def combos() -> list[tuple[str, bool, str, str]]:
    """(paradigm, per_layer, gram, comm): every paradigm x per-layer x engine; comm cycles auto/tokens/units."""
    out, i, j = [], 0, 0
    for paradigm in PARADIGMS:
        for per_layer in (False, True):
            for gram in GRAMS:
                if gram == "exact":
                    comm, i = ("auto", "units")[i % 2], i + 1
                else:
                    comm, j = ("auto", "tokens", "units")[j % 3], j + 1
                out.append((paradigm, per_layer, gram, comm))
    return out


def key(combo) -> str:
    return "{}-{}-{}-{}".format(combo[0], "pl" if combo[1] else "global", combo[2], combo[3])


# ---- the worker (one rank) -----------------------------------------------------------------------------------

def global_batches(paradigm, tok, model):
    """The loss and the STEPS (general, target) batches of the union, built before any process group exists."""
    from drpt_ref.data.tasks import TARGET, general_pool, get_task
    from drpt_ref.training.train import TrainConfig, make_batches, unit_loss_of

    cfg = TrainConfig(paradigm=paradigm, n_general=N, m_target=M, group_size=3, reward="partial")
    target_set = getattr(get_task(TARGET), paradigm)(16, 0, "train")
    pool = general_pool(200, 0, "train", paradigm)
    ref = copy.deepcopy(model).requires_grad_(False)
    batches = [make_batches(cfg, s, tok, model, ref, target_set, pool)[:2] for s in range(1, STEPS + 1)]
    if paradigm == "grpo":  # the random model's groups tie on reward (advantage 0): seeded advantages instead
        gen = torch.Generator().manual_seed(0)
        for batch in (b for pair in batches for b in pair):
            adv = torch.randn(batch.num_units, batch.rows_per_unit, generator=gen, dtype=torch.float64)
            batch.extras["advantages"] = (adv - adv.mean(1, keepdim=True)).reshape(-1)  # (R,) zero mean per group
    return unit_loss_of(cfg), batches


def run_steps(model, loss_fn, batches, combo, rank=0, world=1, records=None) -> dict:
    """STEPS AdamW Dr steps (capped simplex, k = 2) on this rank's share of each batch. -> covered name -> tensor
    records: if a dict, the first step's `comm` record (with the batch's T and rows per unit) is put there."""
    _, per_layer, gram, comm = combo
    model = copy.deepcopy(model)
    params = freeze_uncovered(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step, (general, target) in enumerate(batches, 1):
        if world > 1:
            general = general.select_units(range(*share(general.num_units, rank, world)))
            target = target.select_units(range(*share(target.num_units, rank, world)))
        rec = dr_step(model, opt, loss_fn, general, target, "capped_simplex", Knobs(k=2.0), per_layer=per_layer,
                      gram=gram, sketch_dim=8, seed=step, comm=comm)
        if step == 1 and records is not None:
            records[key(combo)] = dict(rec["comm"], T=general.input_ids.shape[1], rpu=general.rows_per_unit)
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def refusals(model, loss_fn, batches, rank, world) -> dict:
    """The messages of what a distributed step refuses (each must raise a ValueError)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from drpt_ref.training.dr_step import WeightRule

    general, target = (b.select_units(range(*share(b.num_units, rank, world))) for b in batches[0])
    out = {}

    def attempt(name, fn):
        try:
            fn()
            out[name] = "not refused"
        except ValueError as err:
            out[name] = str(err)

    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(freeze_uncovered(plain), lr=0.1)
    attempt("ddp", lambda: dr_step(DistributedDataParallel(plain), opt, loss_fn, general, target, "simplex", Knobs()))

    class Rule(WeightRule):
        def __call__(self, ctx):
            return 1.0, torch.zeros(ctx.b.shape[-1]), {}

    attempt("rule", lambda: dr_step(plain, opt, loss_fn, general, target, "rule", Knobs(), rule=Rule()))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    sharded = copy.deepcopy(model)
    layer = sharded.transformer.h[0].mlp.c_fc
    mesh = init_device_mesh("cpu", (world,))
    layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Replicate()]))
    attempt("dtensor", lambda: check_model(sharded))
    dist.barrier()
    return out


def worker(model_path: str, out_dir: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).double().eval()
    data = {p: global_batches(p, tok, model) for p in PARADIGMS}  # the union's batches, the same on every rank
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    params, records = {}, {}
    for combo in combos():
        loss_fn, batches = data[combo[0]]
        for name, p in run_steps(model, loss_fn, batches, combo, rank, world, records).items():
            params[f"{key(combo)}/{name}"] = p
    refused = refusals(model, *data["sft"], rank, world)
    dist.destroy_process_group()
    save_file(params, os.path.join(out_dir, f"rank{rank}.safetensors"))
    if rank == 0:  # one process on the union of the batches, the same batches, the same process
        ref = {"initial/" + n: p.detach().clone() for n, p in model.named_parameters()}
        for combo in combos():
            loss_fn, batches = data[combo[0]]
            ref.update({f"{key(combo)}/{n}": p for n, p in run_steps(model, loss_fn, batches, combo).items()})
        save_file(ref, os.path.join(out_dir, "single.safetensors"))
        with open(os.path.join(out_dir, "refused.json"), "w") as f:
            json.dump({"refused": refused, "records": records}, f)


# ---- launching ranks as torchrun does ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, argv: list[str], cwd=ROOT, timeout=900) -> None:
    """Start `world` processes of `python argv` with torchrun's environment; fail with their output if any fails."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        procs.append(subprocess.Popen([sys.executable] + argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} of {world} failed:\n{text[-4000:]}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", params=[2, 3])
def runs(request, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"world{request.param}")
    launch(request.param, [os.path.abspath(__file__), "worker", tiny, str(out)])
    ranks = [load_file(os.path.join(out, f"rank{r}.safetensors")) for r in range(request.param)]
    with open(os.path.join(out, "refused.json")) as f:
        found = json.load(f)
    return request.param, ranks, load_file(os.path.join(out, "single.safetensors")), found["refused"], found["records"]


def test_ranks_agree_bitwise_and_equal_one_process_on_the_union(runs):
    world, ranks, single = runs[:3]
    assert set(ranks[0]) == {k for k in single if not k.startswith("initial/")}
    for name, p in ranks[0].items():
        for r in range(1, world):
            assert torch.equal(ranks[r][name], p), f"rank {r} differs from rank 0 on {name} (world {world})"
        assert (p - single[name]).abs().max() <= TOL, f"{name}: {(p - single[name]).abs().max():.2e} from one process"
    for combo in combos():  # every run moved the weights well beyond the tolerance: the comparison can fail
        moved = max(float((ranks[0][f"{key(combo)}/{n}"] - single[f"initial/{n}"]).abs().max())
                    for n in (k.split("/", 1)[1] for k in ranks[0] if k.startswith(key(combo) + "/")))
        assert moved > 1e3 * TOL, f"{key(combo)} barely moved ({moved:.1e})"


def test_bytes_per_step_follow_eq_4_of_the_theory_note(runs, tiny):
    """Gram bytes = (W - 1) x (losses + every layer's message), tokens R T (d_in + d_out) or units U p_l, float64;
    update bytes = 2 (W - 1) / W p, from the model's covered layers (eqs. (2), (4) in theory/distributed.md)."""
    from transformers import AutoModelForCausalLM

    from drpt_ref.gram.layers import covered_layers

    world, records = runs[0], runs[4]
    layers = covered_layers(AutoModelForCausalLM.from_pretrained(tiny))
    p = sum(ly.num_params for ly in layers)
    U = max(share(N, r, world)[1] - share(N, r, world)[0] + share(M, r, world)[1] - share(M, r, world)[0]
            for r in range(world))  # the largest share of units: messages are padded to it
    seen = set()
    for combo in combos():
        rec = records[key(combo)]
        assert rec["world"] == world and rec["update_bytes"] == int(2 * (world - 1) / world * p * 8)
        tokens = [U * rec["rpu"] * rec["T"] * (ly.d_in + ly.d_out) for ly in layers]
        units = [U * ly.num_params for ly in layers] if combo[2] != "sketch" else [U * (8 * 8 + 8)] * len(layers)
        if combo[2] == "sketch":
            tokens = [U * rec["rpu"] * rec["T"] * 16] * len(layers)
        want = [{"tokens": t, "units": u, "auto": min(t, u)}[combo[3]] for t, u in zip(tokens, units)]
        if combo[2] == "exact":
            want = units
        assert rec["gram_bytes"] == (world - 1) * 8 * (U + sum(want)), key(combo)
        seen |= set(rec["forms"])
    assert seen == {"tokens", "units"}


def test_unsupported_setups_are_refused_with_a_message(runs):
    refused = runs[3]
    assert "model.module" in refused["ddp"] and "DistributedDataParallel" in refused["ddp"]
    assert "only the projections" in refused["rule"]
    assert "DTensor" in refused["dtensor"] and "tensor parallelism" in refused["dtensor"]


def test_shares_are_contiguous_balanced_and_need_a_unit_of_each_kind():
    for count, world in ((5, 2), (3, 3), (16, 3), (7, 4)):
        bounds = [share(count, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous: the union is the drawn order
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1
    assert local_units(list("abcde"), None) == list("abcde")
    with pytest.raises(ValueError, match="--n-general 2 and --m-target 4 .* 3 ranks"):
        check_shares(2, 4, 3)


def test_drpt_train_on_two_processes_ends_where_one_process_ends(tiny, tmp_path):
    flags = dict(paradigm="sft", optimizer="adamw", lr=1e-2, method="capped_simplex", k=2, n_general=5, m_target=3,
                 steps=3)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "drpt_ref"] + train_argv(tiny, one, **flags), cwd=ROOT, check=True,
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    launch(2, ["-m", "drpt_ref"] + train_argv(tiny, two, **flags))
    a, b = final_params(one), final_params(two)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= TOL
    assert max(float((a[k] - load_file(os.path.join(tiny, "model.safetensors"))[k]).abs().max())
               for k in a if k in load_file(os.path.join(tiny, "model.safetensors"))) > 1e3 * TOL
    records = [json.loads(line) for line in open(two / "metrics.jsonl")]
    assert len(records) == 3 and all(len(r["weights"][0]) == 5 and r["comm"]["world"] == 2 for r in records)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # rank 1 wrote nothing of its own


def test_bench_comm_prints_bytes_against_the_world_size(tiny, tmp_path, capsys):
    """`drpt bench comm` on 1 and 2 gloo processes: W = 1 sends nothing, W = 2 the sketches' per-unit gradients
    (U = 4 units of k^2 + k float32 numbers per layer, plus the losses) and the update; bad flags are refused."""
    from drpt_ref.cli import main

    out = tmp_path / "comm.md"
    argv = ["bench", "comm", "--model", tiny, "--worlds", "1,2", "--lengths", "8", "--grams", "sketch", "--comms",
            "units", "--sketch-dim", "4", "--n-general", "6", "--m-target", "2", "--repeat", "1", "--out", str(out)]
    assert main(argv) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| 1 ") or
            line.startswith("| 2 ")]
    assert [r[0].strip() for r in rows] == ["1", "2"]
    assert float(rows[0][5]) == 0 and float(rows[1][5]) == round((4 + 8 * 4 * (4 * 4 + 4)) * 4 / 1024, 1)
    for bad, flag in ((["--worlds", "0,2"], "--worlds"), (["--worlds", "4", "--m-target", "2"], "--m-target 2")):
        with pytest.raises(SystemExit) as exit_:
            main(["bench", "comm"] + bad)
        assert exit_.value.code == 2 and flag in capsys.readouterr().err


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(sys.argv[2], sys.argv[3])
