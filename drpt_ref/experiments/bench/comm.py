"""`drpt bench comm`: bytes and seconds per Dr step spent in communication, against the world size.

For each world size W of --worlds this command starts W processes as torchrun would (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT; backend gloo on --device cpu, nccl on cuda with rank r on cuda:r), each running
`python -m drpt_ref.experiments.bench.comm --worker ...`. On a random GPT-2 of --model's shape, with n general and
m target SFT units of T tokens (synthetic, as `drpt bench step`), every rank takes its share (eq. (1) in
theory/distributed.md) and times --repeat Dr steps (after one warm-up) for each cell of T x gram x comm:

    Gram bytes     what each rank receives in the Gram's all_gather, (W - 1) sum_l S_l (eq. (4) there)
    update bytes   what each rank sends in the ring all_reduce of the update, 2 (W - 1) / W p s
    Gram s, update s, step s   seconds in the two collectives and in the whole step (median over repeats)

W = 1 is the single-process step (no communication). The forms column counts the layers that sent tokens (a, e)
and units (per-unit gradients), as --comm chose them (eq. (2)).

Shapes: general input_ids (n, T), target (m, T); rank r holds (n_r, T) and (m_r, T).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile

import torch

from drpt_ref.distributed.ranks import COMMS, current_ranks, share
from drpt_ref.experiments.bench.run_flags import add_model_run_flags, check_model_run_flags
from drpt_ref.experiments.bench.solvers import cpu_name
from drpt_ref.experiments.bench.step import make_model, token_batch
from drpt_ref.flags import write_output
from drpt_ref.losses.sft import SFTLoss
from drpt_ref.training.dr_step import Knobs, dr_step, freeze_uncovered


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device: cpu (gloo) or cuda (nccl, one GPU per rank)")
    parser.add_argument("--worlds", default="1,2,3,4", help="comma-separated world sizes (processes)")
    parser.add_argument("--lengths", default="32,128", help="comma-separated T (tokens per unit)")
    parser.add_argument("--grams", default="ghost,sketch", help="comma-separated Gram engines: ghost, sketch, exact")
    parser.add_argument("--comms", default="auto,tokens,units", help=f"comma-separated forms, of {COMMS}")
    parser.add_argument("--n-general", type=int, default=16, help="general units per step (over all ranks)")
    parser.add_argument("--m-target", type=int, default=4, help="target units per step (over all ranks)")
    add_model_run_flags(parser, "steps per cell")


def check_args(args) -> tuple[list[int], list[int], list[str], list[str]]:
    """The parsed lists, or a ValueError naming the flag."""
    check_model_run_flags(args)
    def ints(flag, text):
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise ValueError(f"--{flag} {text!r}: give comma-separated positive integers.")
        return values

    worlds, lengths = ints("worlds", args.worlds), ints("lengths", args.lengths)
    grams, comms = args.grams.split(","), args.comms.split(",")
    if not set(grams) <= {"ghost", "sketch", "exact"} or not set(comms) <= set(COMMS):
        raise ValueError(f"--grams {args.grams!r} / --comms {args.comms!r}: use ghost, sketch, exact / {COMMS}.")
    if min(args.n_general, args.m_target) < max(worlds):
        raise ValueError(f"--n-general {args.n_general} and --m-target {args.m_target} must be >= the largest of "
                         f"--worlds ({max(worlds)}): every rank holds a general and a target unit.")
    if args.device.startswith("cuda") and max(worlds) > torch.cuda.device_count():
        raise ValueError(f"--worlds {args.worlds}: one GPU per rank, and {torch.cuda.device_count()} are visible.")
    return worlds, lengths, grams, comms


# ---- one rank ----------------------------------------------------------------------------------------------

def worker(args, out_file: str) -> None:
    """The timed steps of one rank; rank 0 (or the single process) appends one JSON line per cell."""
    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if world > 1:
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    ranks = current_ranks()
    rank = 0 if ranks is None else ranks.rank
    _, lengths, grams, comms = check_args(args)
    rows = []
    for T in lengths:
        model = make_model(args.model, T, device, args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        vocab = model.config.vocab_size
        general, target = token_batch(args.n_general, T, vocab, gen, device), token_batch(args.m_target, T, vocab,
                                                                                          gen, device)
        general = general.select_units(range(*share(args.n_general, rank, world)))
        target = target.select_units(range(*share(args.m_target, rank, world)))
        for gram in grams:
            for comm in comms if world > 1 else ["auto"]:
                if gram == "exact" and comm == "tokens":
                    continue
                opt = torch.optim.SGD(freeze_uncovered(model), lr=1e-6)
                recs = [dr_step(model, opt, SFTLoss(), general, target, "simplex", Knobs(), gram=gram,
                                sketch_dim=args.sketch_dim, seed=args.seed, comm=comm)
                        for _ in range(args.repeat + 1)][1:]  # the first is a warm-up
                med = lambda f, recs=recs: statistics.median(f(r) for r in recs)  # noqa: E731
                c = recs[0].get("comm", {"forms": [], "gram_bytes": 0, "update_bytes": 0})
                rows.append({"world": world, "T": T, "gram": gram, "comm": comm if world > 1 else "-",
                             "tokens": c["forms"].count("tokens"), "units": c["forms"].count("units"),
                             "gram_bytes": c["gram_bytes"], "update_bytes": c["update_bytes"],
                             "gram_s": med(lambda r: r.get("comm", {}).get("gram_seconds", 0.0)),
                             "update_s": med(lambda r: r.get("comm", {}).get("update_seconds", 0.0)),
                             "step_s": med(lambda r: sum(r["seconds"].values()))})
    if rank == 0:
        with open(out_file, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if ranks is not None:
        torch.distributed.destroy_process_group()


# ---- the command ---------------------------------------------------------------------------------------------

def launch(world: int, argv: list[str], out_file: str) -> None:
    """W processes of this module as workers, with torchrun's environment; RuntimeError with a rank's output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "drpt_ref.experiments.bench.comm", "--worker", out_file]
                                      + argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate()[0] for p in procs]
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise RuntimeError(f"rank {rank} of {world} failed:\n{text[-3000:]}")


def table(rows: list[dict], args, load: tuple) -> str:
    kb = lambda b: f"{b / 1024:.1f}"  # noqa: E731
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    lines = [f"# `drpt bench comm` ({args.device}, backend {'nccl' if args.device.startswith('cuda') else 'gloo'})",
             "",
             f"{datetime.date.today()}, {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{platform.system()}; load average before the run {load[0]:.2f} (1 min), {args.threads} thread(s) per "
             f"process; model shape {args.model}, n = {args.n_general}, m = {args.m_target} (over all ranks), SFT "
             f"units of T tokens, simplex, sketch k = {args.sketch_dim}; median of {args.repeat} steps after a "
             "warm-up.",
             "", "Gram KB: received per rank and step in the Gram's all_gather; update KB: sent per rank in the ring "
             "all_reduce (eq. (4) in theory/distributed.md). forms: layers that sent tokens / units (eq. (2)).", "",
             "| W | T | gram | comm | forms t/u | Gram KB | update KB | Gram ms | update ms | step ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["T"], r["gram"], r["comm"], r["world"])):
        lines.append(f"| {r['world']} | {r['T']} | {r['gram']} | {r['comm']} | {r['tokens']}/{r['units']} | "
                     f"{kb(r['gram_bytes'])} | {kb(r['update_bytes'])} | {ms(r['gram_s'])} | {ms(r['update_s'])} | "
                     f"{ms(r['step_s'])} |")
    return "\n".join(lines)


def run(args) -> int:
    worlds, *_ = check_args(args)
    load = os.getloadavg()
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("what", "func", "out")]
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.jsonl")
        for world in worlds:
            print(f"W = {world} ...", flush=True)
            launch(world, argv, out_file)
        with open(out_file) as f:
            rows = [json.loads(line) for line in f]
    text = table(rows, args, load)
    print(text)
    if args.out:
        write_output(args.out, text)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--worker", required=True)
    ns, _ = parser.parse_known_args()
    worker(ns, ns.worker)
