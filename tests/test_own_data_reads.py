"""One read of each own data file at the start of `drpt train` (--target-data, --general-data, --eval-data).

The flag checks (their columns), the encoding of the units and config.json's data_sha256 (which --resume
compares) are served by one read of each file: drpt_ref opens each file once, and `datasets` parses it once.
The stored sha256 is checked against hashlib over the file's bytes read here. One file per format (JSONL,
CSV, Parquet), so the CSV header and the Parquet path are counted too.

Shapes: no tensors; counts per file path.
"""

import builtins
import hashlib
import json
import os
import random
import sys

import torch
from test_own_data import argv, config_of, example, write_jsonl, write_model

from drpt_ref.training.train import train

torch.set_num_threads(2)


def data_files(folder) -> dict[str, str]:
    """target (JSONL, 12 rows of 'add'), general (CSV, 30 rows of three sources), eval (Parquet, 6 rows of 'add')."""
    import datasets

    rng = random.Random(0)
    strip = lambda r: {k: v for k, v in r.items() if k != "messages"}  # noqa: E731  (no nested column in CSV)
    general = [strip(example(rng, ("add", "copy", "shout")[i % 3])) for i in range(30)]
    target = write_jsonl(folder / "target.jsonl", [example(rng, "add") for _ in range(12)])
    datasets.Dataset.from_list(general).to_csv(str(folder / "general.csv"), index=False)
    datasets.Dataset.from_list([strip(example(rng, "add")) for _ in range(6)]).to_parquet(str(folder / "eval.parquet"))
    return {"target": target, "general": str(folder / "general.csv"), "eval": str(folder / "eval.parquet")}


def test_each_data_file_is_read_once_and_its_sha256_stored(tmp_path, monkeypatch):
    import datasets

    files = data_files(tmp_path)
    paths = {os.path.abspath(p): flag for flag, p in files.items()}
    opens, parses = {p: 0 for p in paths}, {p: 0 for p in paths}
    real_open, real_load = builtins.open, datasets.load_dataset

    def counting_open(file, *args, **kwargs):  # drpt_ref's own opens of a data file (datasets' are its parse)
        name = os.path.abspath(file) if isinstance(file, (str, os.PathLike)) else None
        if name in opens and sys._getframe(1).f_globals.get("__name__", "").startswith("drpt_ref"):
            opens[name] += 1
        return real_open(file, *args, **kwargs)

    def counting_load(*args, data_files=None, **kwargs):
        for name in [data_files] if isinstance(data_files, str) else list(data_files or ()):
            if os.path.abspath(name) in parses:
                parses[os.path.abspath(name)] += 1
        return real_load(*args, data_files=data_files, **kwargs)

    model = write_model(tmp_path / "llama", "llama")
    args = argv(model, files, tmp_path / "run", "sft", steps=1, checkpoint_every=1, eval_every=1)
    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(datasets, "load_dataset", counting_load)
    run = train(config_of(args))
    monkeypatch.undo()
    assert opens == {p: 1 for p in paths}, opens  # one read of the bytes: the sha256 (and a CSV header)
    assert parses == {p: 1 for p in paths}, parses  # one parse: the columns checked and the units encoded
    with open(os.path.join(run, "config.json")) as f:
        stored = json.load(f)["data_sha256"]
    for flag, path in (("--target-data", files["target"]), ("--general-data", files["general"]),
                       ("--eval-data", files["eval"])):
        with open(path, "rb") as f:
            assert stored[flag] == hashlib.sha256(f.read()).hexdigest(), flag
