"""Your own model and data (issue 16, items 1-2): `drpt train` on JSONL files with any HF tokenizer.

Tiny Llama, Qwen2 and GPT-NeoX models are built from configs (random weights, safetensors, nothing
downloaded) with a byte-level BPE tokenizer trained here by `tokenizers` (no pad token; the Qwen2 folder has
a chat template and reads its SFT data as messages). Through `drpt train` (cli.main), for SFT, DPO and GRPO:
    - the ghost Gram of the run's first batches equals the exact per-unit Gram within 1e-6 (float64);
    - only covered parameters change; metrics, sources, weights and the held-out evaluation are logged.
And: exact match by teacher forcing == greedy decoding (transformers' generate); GRPO rows are the ids as
sampled even where re-encoding their text gives other ids; truncation (eq. (4) of theory/own_data.md); the
chat template split; JSONL, Parquet and CSV read alike; bad flags refused with the flag named; README's
"Your own model and data" command runs on the shipped example.
"""

import json
import os
import random
import re
import shlex

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from drpt_ref.cli import main
from drpt_ref.data.encode_rows import completion_ids, prompt_ids, truncate
from drpt_ref.data.files import IdsPrompt, read_units
from drpt_ref.data.tokenizer import prepare_tokenizer
from drpt_ref.gram.compute import compute_gram
from drpt_ref.gram.layers import covered_parameters
from drpt_ref.training.evaluate import reference_match
from drpt_ref.training.model_folder import load_model_folder
from drpt_ref.training.run_state import read_metrics
from drpt_ref.training.train import TrainConfig, check_settings, make_batches, train, unit_loss_of
from drpt_ref.training.train_data import data_source, grpo_batch

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GHOST_RTOL = 1e-6  # the bar; ghost and exact are the same sums reordered (~1e-15 in float64)
SOURCES = ("add", "copy", "shout")
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ARCHS = {  # config class, the eos token, whether the folder has a chat template (then SFT reads messages)
    "llama": (LlamaConfig, "<|endoftext|>", False),
    "qwen2": (Qwen2Config, "<|im_end|>", True),
    "gpt_neox": (GPTNeoXConfig, "<|endoftext|>", False),
}


def vowel_reward(prompt, completion: str) -> float:
    """The GRPO reward of these tests (imported by drpt train as test_own_data:vowel_reward)."""
    return sum(ch in "aeiouAEIOU" for ch in completion) / 4.0


def example(rng: random.Random, source: str) -> dict:
    """One row with text outside the suite's alphabet (capitals, 'W', punctuation)."""
    a, b = rng.randrange(100), rng.randrange(100)
    word = "".join(rng.choice("abcdefghij") for _ in range(rng.randrange(2, 6)))
    prompt, right, wrong = {
        "add": (f"What is {a} + {b}? Answer:", f" {a + b}", f" {a + b + 1}"),
        "copy": (f"Copy the Word '{word}':", f" {word}", f" {word[::-1]}x"),
        "shout": (f"Shout '{word}' As Written:", f" {word.upper()}!", f" {word}."),
    }[source]
    return {"prompt": prompt, "completion": right, "chosen": right, "rejected": wrong, "source": source,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": right.strip()}]}


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """target (12 rows of 'add'), general (30 rows, three sources), eval (6 rows of 'add')."""
    folder, rng = tmp_path_factory.mktemp("own_data"), random.Random(0)
    general = [example(rng, SOURCES[i % 3]) for i in range(30)]
    return {"target": write_jsonl(folder / "target.jsonl", [example(rng, "add") for _ in range(12)]),
            "general": write_jsonl(folder / "general.jsonl", general),
            "eval": write_jsonl(folder / "eval.jsonl", [example(rng, "add") for _ in range(6)])}


def bpe_tokenizer(eos: str, chat: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on the test rows' text: 300 tokens, no pad token."""
    rng = random.Random(1)
    corpus = [json.dumps(example(rng, SOURCES[i % 3])) for i in range(300)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos)
    if chat:
        tok.chat_template = CHAT
    return tok


def write_model(folder, arch: str) -> str:
    config_cls, eos, chat = ARCHS[arch]
    tok = bpe_tokenizer(eos, chat)
    torch.manual_seed(0)
    sizes = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                 bos_token_id=tok.eos_token_id)
    if arch != "gpt_neox":
        sizes["num_key_value_heads"] = 2
    model = AutoModelForCausalLM.from_config(config_cls(**sizes))
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {arch: write_model(tmp_path_factory.mktemp(arch), arch) for arch in ARCHS}


def argv(model: str, files: dict, out, paradigm: str, sft_messages: bool = False, **extra) -> list[str]:
    args = dict(paradigm=paradigm, model=model, out=str(out), target_data=files["target"],
                general_data=files["general"], eval_data=files["eval"], steps=3, n_general=5, m_target=2,
                eval_every=3, checkpoint_every=3, eval_n=6, dtype="float64", lr=1e-2, progress="false",
                group_size=3, max_new_tokens=6, method="simplex")
    if paradigm == "grpo":
        args["reward_fn"] = "test_own_data:vowel_reward"
    args.update(extra)
    return ["train"] + [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def config_of(args: list[str]) -> TrainConfig:
    """The TrainConfig that `drpt train args` runs (flags parsed by the command's own parser)."""
    import argparse

    from drpt_ref.training.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(args[1:])
    return TrainConfig(**vars(ns))


@pytest.mark.parametrize("paradigm", ["sft", "dpo", "grpo"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_drpt_train_on_files(model_dirs, data_files, tmp_path, capsys, arch, paradigm):
    files = dict(data_files)
    if ARCHS[arch][2] and paradigm == "sft":  # Qwen2 with its chat template: the SFT rows as messages
        rows = [json.loads(line) for line in open(files["target"])]
        files["target"] = write_jsonl(tmp_path / "target_messages.jsonl",
                                      [{"messages": r["messages"]} for r in rows])
    args = argv(model_dirs[arch], files, tmp_path / "run", paradigm)
    had_pad = load_model_folder(model_dirs[arch])[1].pad_token_id is not None  # Qwen2's tokenizer class sets one
    assert main(args) == 0
    assert ("no pad token: padding with its eos token" in capsys.readouterr().out) == (not had_pad)
    # ---- metrics: every step, the weights and sources of its general units, the held-out evaluation ---------------
    records = read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert len(r["sources"]) == len(r["weights"][0]) == 5 and set(r["sources"]) <= set(SOURCES)  # (B, n)
        assert all(g == "general" for g in r["groups"])
    last = records[-1]
    if paradigm == "grpo":
        assert 0.0 <= last["eval_reward"] and "eval_accuracy" in last  # the eval rows have a completion too
    assert 0.0 <= last["eval_accuracy"] <= 1.0 and last["eval_loss"] > 0.0
    # ---- only covered parameters changed, and the covered ones did -------------------------------------------
    model, tok = load_model_folder(model_dirs[arch])  # named as transformers names them (GPT-NeoX's embed_out
    final = dict(load_model_folder(str(tmp_path / "run" / "final"))[0].named_parameters())  # is lm_head)
    covered = set(covered_parameters(model))
    changed = {k for k, p in model.named_parameters() if not torch.equal(p.double(), final[k].double())}
    assert changed and changed <= covered, changed - covered
    assert any("mlp" in k for k in changed)
    # ---- the ghost Gram of the run's first batches equals the exact per-unit Gram --------------------------------
    cfg = config_of(args)
    model = model.double().eval()
    ref_model = load_model_folder(model_dirs[arch])[0].double().eval() if paradigm != "sft" else None
    data = data_source(cfg, tok, model)
    target_set, pool = data.sets()
    general, target, _ = make_batches(cfg, 1, tok, model, ref_model, target_set, pool)
    exact = compute_gram(model, unit_loss_of(cfg), general, target, "exact")
    ghost = compute_gram(model, unit_loss_of(cfg), general, target, "ghost")
    for g, e in zip(ghost.total(), exact.total()):
        assert float((g - e).norm() / e.norm()) <= GHOST_RTOL
    assert exact.K.shape[-1] == 5 and float(exact.total()[0].trace()) > 0


class StopAt:
    """A tokenizer stand-in for reference_match whose <eos> is any chosen id (pad: the real eos)."""

    def __init__(self, eos: int, pad: int):
        self.eos_token_id, self.pad_token_id = eos, pad


def test_exact_match_by_teacher_forcing_is_greedy_decoding(model_dirs, data_files):
    """reference_match (eq. (5) of theory/own_data.md) against transformers' own greedy `generate`: with g the
    greedy continuation of a prompt, the reference g[:2] followed by 'eos' = g[2] is what greedy decoding
    emits (a hit), and g[:2] with its second token changed is not (a miss). Batched with another prompt's
    miss (other lengths: padding), each pair scores exactly 1/2."""
    model, tok = load_model_folder(model_dirs["llama"])
    model = model.double().eval()
    units = read_units(data_files["eval"], "--eval-data", "sft", "eval", tok, max_length=64)
    greedy = []
    for u in units:
        out = model.generate(torch.tensor([u.prompt]), attention_mask=torch.ones(1, len(u.prompt), dtype=torch.long),
                             max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
        greedy.append(out[0, len(u.prompt):].tolist())  # (3,) greedy tokens (fewer if it emitted <eos>)
    assert all(len(g) == 3 for g in greedy)  # a random model stopping within 3 tokens: unlikely, and seeded
    V = model.config.vocab_size
    for i, (u, g) in enumerate(zip(units, greedy)):
        j = (i + 1) % len(units)
        hit = IdsPrompt(u.prompt, tuple(g[:2]), "eval", "target")
        miss = IdsPrompt(units[j].prompt, (greedy[j][0], (greedy[j][1] + 1) % V), "eval", "target")
        stop = StopAt(eos=g[2], pad=tok.eos_token_id)
        assert reference_match(model, stop, [hit])[0] == 1.0
        assert reference_match(model, stop, [miss])[0] == 0.0
        accuracy, loss = reference_match(model, stop, [hit, miss])
        assert accuracy == 0.5 and loss > 0


def test_grpo_trains_on_the_sampled_ids_not_their_re_encoding(model_dirs, data_files):
    """With a BPE tokenizer the text of a sampled completion re-encodes to other ids (merges); the loss rows
    must hold the ids as sampled, which is what the old-policy log-probs and the ratio are about."""
    model, tok = load_model_folder(model_dirs["gpt_neox"])
    model, tok = model.double().eval(), prepare_tokenizer(tok, say=lambda message: None)  # pad: eos
    units = read_units(data_files["target"], "--target-data", "grpo", "target", tok, max_length=64,
                       reward_fn=vowel_reward, max_new_tokens=8)[:6]
    gen = torch.Generator().manual_seed(0)
    batch, rewards = grpo_batch(tok, model, units, 4, gen, max_new_tokens=8)
    assert rewards.shape == (6, 4)
    gen = torch.Generator().manual_seed(0)
    from drpt_ref.data.sampling import sample_completions

    texts, sampled = sample_completions(model, tok, [u.prompt for u in units], 4, 8, 1.0, gen)
    differ = 0
    for r in range(24):
        u, ids = units[r // 4], sampled[r // 4][r % 4]
        row = batch.input_ids[r][batch.attention_mask[r].bool()].tolist()
        assert row == list(u.prompt) + ids + [tok.eos_token_id]
        assert batch.loss_mask[r].sum() == len(ids) + 1
        differ += tok(texts[r // 4][r % 4], add_special_tokens=False)["input_ids"] != ids
    assert differ > 0  # the test is meaningful: re-encoding would have changed some rows


def test_truncation_keeps_the_prompt_end_and_the_completion_start():
    P, C = list(range(100, 120)), list(range(10))  # prompt 20, completion 10 (+ eos = 11)
    assert truncate(P, [C], 31) == (P, [C])  # fits: unchanged
    p, (c,) = truncate(P, [C], 23)  # completion fits in its half-share (11 of 23): kept whole, prompt its end
    assert c == C and p == P[-12:]
    p, (c,) = truncate(P, [C], 21)  # it does not (11 > 10): its start kept, with <eos> 10 tokens
    assert c == C[:9] and p == P[-11:]
    p, (c,) = truncate(P, [C], 12)  # both long: completion keeps 6 with eos (its start), prompt its last 6
    assert c == C[:5] and p == P[-6:] and len(p) + len(c) + 1 == 12
    p, (a, b) = truncate(P[:3], [C, C[:2]], 8)  # a pair shares the prompt; the longer completion decides
    assert a == C[:4] and b == C[:2] and p == P[:3]
    with pytest.raises(ValueError, match="max_length"):
        truncate(P, [C], 1)


def test_rows_cut_to_max_length(model_dirs, data_files):
    _, tok = load_model_folder(model_dirs["llama"])
    full = read_units(data_files["general"], "--general-data", "dpo", "general", tok, max_length=None)
    cut = read_units(data_files["general"], "--general-data", "dpo", "general", tok, max_length=9)
    assert any(len(u.prompt) + len(u.chosen) + 1 > 9 for u in full)
    for f, u in zip(full, cut):
        assert len(u.prompt) + max(len(u.chosen), len(u.rejected)) + 1 <= 9
        assert f.prompt[len(f.prompt) - len(u.prompt):] == u.prompt and f.chosen[:len(u.chosen)] == u.chosen
        assert u.task == f.task in SOURCES


def test_chat_template_completion_is_the_assistant_turn(model_dirs):
    _, tok = load_model_folder(model_dirs["qwen2"])
    prompt = [{"role": "user", "content": "Copy the Word 'abc':"}]
    p = prompt_ids(tok, prompt)
    c = completion_ids(tok, prompt, [{"role": "assistant", "content": "abc"}])
    whole = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "abc"}], tokenize=False)
    assert tok.decode(p) + tok.decode(c) + "<|im_end|>\n" == whole  # the row is the template up to <eos>
    assert tok.decode(p).endswith("<|im_start|>assistant\n") and tok.decode(c) == "abc"
    assert completion_ids(tok, prompt, "abc") == c  # a text completion after messages: one assistant turn
    _, plain = load_model_folder(model_dirs["llama"])
    with pytest.raises(ValueError, match="no chat template"):
        prompt_ids(plain, prompt)


def test_jsonl_parquet_csv_read_alike(model_dirs, data_files, tmp_path):
    import datasets

    _, tok = load_model_folder(model_dirs["llama"])
    table = datasets.load_dataset("json", data_files=data_files["general"], split="train").remove_columns("messages")
    table.to_parquet(str(tmp_path / "g.parquet"))
    table.to_csv(str(tmp_path / "g.csv"), index=False)
    units = [read_units(p, "--general-data", "dpo", "general", tok, max_length=64)
             for p in (data_files["general"], str(tmp_path / "g.parquet"), str(tmp_path / "g.csv"))]
    assert units[0] == units[1] == units[2] and len(units[0]) == 30


@pytest.mark.parametrize("change, flag", [
    (dict(general_data="missing.jsonl"), "--general-data"),
    (dict(target_data=""), "--target-data"),
    (dict(general_data=None), "--general-data"),
    (dict(source_column="origin"), "--source-column"),
    (dict(reward_fn="no_such_module_xyz:f"), "--reward-fn"),
    (dict(reward_fn="test_own_data"), "--reward-fn"),
    (dict(paradigm="hpt", method="hpt", reward_fn=""), "--paradigm hpt"),
    (dict(paradigm="sft", reward_fn="test_own_data:vowel_reward"), "--reward-fn"),
    (dict(max_length=7), "--max-length"),
    (dict(target_data="wrong_columns"), "--target-data"),
])
def test_bad_data_flags_name_the_flag(model_dirs, data_files, tmp_path, change, flag):
    files = dict(data_files)
    if change.get("target_data") == "wrong_columns":  # a GRPO file must have a prompt column
        change = dict(target_data=write_jsonl(tmp_path / "t.jsonl", [{"question": "x", "source": "a"}]))
    if change.get("general_data", "") is None:
        change = dict(general_data="")
    cfg = config_of(argv(model_dirs["llama"], files, tmp_path / "run", "grpo"))
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=re.escape(flag)):
        check_settings(cfg)
    assert not os.path.exists(tmp_path / "run")


def test_readme_own_data_command_runs(tmp_path, capsys):
    """README's "Your own model and data" commands, run as written (only --out moved to a temporary folder)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Your own model and data", 1)[1].split("\n## ", 1)[0]
    commands = [line for line in section.replace("\\\n", " ").splitlines() if line.startswith("drpt train")]
    assert commands, "README's section has no drpt train command"
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        for i, command in enumerate(commands):
            words = shlex.split(command.split("#")[0])
            if "--out" in words:
                words[words.index("--out") + 1] = str(tmp_path / f"run{i}")
            assert main(words[1:]) == 0
            records = read_metrics(str(tmp_path / f"run{i}"))
            assert records and ("eval_accuracy" in records[-1] or "eval_reward" in records[-1])
            assert set(records[-1]["sources"]) <= {"add2", "carry", "copy", "reverse", "sort", "add3_rev",
                                                  "add3_noisy"}
    finally:
        os.chdir(cwd)


def test_drpt_eval_on_a_bpe_model_without_pad(model_dirs, capsys):
    """`drpt eval` (the suite's held-out prompts) on a model whose tokenizer has no pad token and no alphabet."""
    assert main(["eval", "--model", model_dirs["gpt_neox"], "--task", "add3", "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "no pad token" in out and re.search(r"^add3\s+target\s+4\s", out, re.M)


NOT_CALLABLE = 3  # a --reward-fn target that exists but is not a function


@pytest.mark.parametrize("bad, message", [
    ("non_utf8", "is not UTF-8 text"), ("none_source", "the source label"), ("empty", "is empty"),
    ("not_callable", "not a function")])
def test_bad_file_contents_name_the_flag_and_the_row(model_dirs, data_files, tmp_path, capsys, bad, message):
    """Data that cannot be read as the user meant it is refused with the flag, file and row named, before any
    run folder is written: bytes that are not UTF-8, a general row without a source label (never logged as the
    source 'None'), an empty file, a --reward-fn name that is not a function."""
    files = dict(data_files)
    if bad == "non_utf8":
        path = tmp_path / "g.jsonl"
        path.write_bytes(b'{"prompt": "caf\xe9 ?", "completion": " x", "source": "a"}\n')
        files["general"] = str(path)
    elif bad == "none_source":
        files["general"] = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "completion": " b", "source": None}])
    elif bad == "empty":
        (tmp_path / "t.jsonl").write_bytes(b"")
        files["target"] = str(tmp_path / "t.jsonl")
    args = argv(model_dirs["llama"], files, tmp_path / "run", "grpo" if bad == "not_callable" else "sft")
    if bad == "not_callable":
        args[args.index("--reward-fn") + 1] = "test_own_data:NOT_CALLABLE"
    with pytest.raises(SystemExit) as exit_:  # the CLI: a usage error with the message, no traceback
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "run") or os.listdir(tmp_path / "run") == []  # nothing written in it


def test_a_tokenizer_that_does_not_fit_the_embedding_is_refused_naming_the_model(model_dirs, data_files, tmp_path):
    small = tmp_path / "small"
    model, tok = load_model_folder(model_dirs["llama"])
    model.resize_token_embeddings(len(tok) - 10)  # the tokenizer of another model
    model.save_pretrained(str(small), safe_serialization=True)
    tok.save_pretrained(str(small))
    with pytest.raises(ValueError, match="--model .* embedding has 290 rows"):
        train(config_of(argv(str(small), data_files, tmp_path / "run", "sft")))


def test_resume_refuses_data_files_that_changed(model_dirs, data_files, tmp_path):
    """config.json keeps the sha256 of every data file: a run resumed on edited data is refused, not continued
    on other data (the same paths, other contents)."""
    files = {k: write_jsonl(tmp_path / f"{k}.jsonl", [json.loads(x) for x in open(v)]) for k, v in data_files.items()}
    args = argv(model_dirs["llama"], files, tmp_path / "run", "sft", steps=2, checkpoint_every=1, eval_every=2)
    train(config_of(args))
    rows = [json.loads(x) for x in open(files["general"])]
    write_jsonl(files["general"], rows[::-1])
    resumed = config_of(args)
    resumed.steps, resumed.resume = 3, True
    with pytest.raises(ValueError, match="data_sha256"):
        train(resumed)
    write_jsonl(files["general"], rows)  # the data as they were: the run resumes
    train(resumed)
