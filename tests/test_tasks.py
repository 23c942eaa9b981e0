"""The task suite and the tokenizer: verifiers against hand-worked examples, determinism, splits,
misaligned samples failing the target's verifier, DPO rejected answers never correct."""

import os

import pytest

from drpt_ref.data.arith import no_carry_sum, wrong_sums
from drpt_ref.data.strings import string_near_misses
from drpt_ref.data.task_base import in_split, partial_credit, split_of
from drpt_ref.data.tasks import GENERAL, TARGET, TASKS, general_pool, get_task, parse_weights, task_names
from drpt_ref.data.tokenizer import ALPHABET, encode_prompts, encode_sft, save_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAND_WORKED = [  # (task, prompt, correct answer), each worked by hand
    ("add3", "123+456=", "0579"),
    ("add3", "999+999=", "1998"),
    ("add3", "505+495=", "1000"),
    ("add2", "12+34=", "046"),
    ("add2", "99+99=", "198"),
    ("carry", "7+8+1=", "16"),
    ("carry", "2+3+0=", "05"),
    ("add3_rev", "123+456=", "9750"),
    ("add3_rev", "999+999=", "8991"),
    ("add3_noisy", "123+456=", "0579"),
    ("copy", "c48213=", "48213"),
    ("reverse", "r48213=", "31284"),
    ("sort", "s48213=", "12348"),
    ("sort", "s9070=", "0079"),
]


@pytest.mark.parametrize("name,prompt,truth", HAND_WORKED)
def test_verifier_hand_worked(name, prompt, truth):
    task = get_task(name)
    assert task.solve(prompt) == truth
    assert task.verify(prompt, truth)
    assert task.reward_exact(prompt, truth) == 1.0
    for wrong in (truth[:-1], truth + "0", truth[::-1] if truth != truth[::-1] else "x" + truth):
        assert not task.verify(prompt, wrong)
        assert task.reward_exact(prompt, wrong) == 0.0


def test_target_rejects_other_formats():
    t = get_task("add3")
    assert not t.verify("123+456=", "579")  # unpadded
    assert not t.verify("123+456=", "9750")  # reversed
    assert not t.verify("123+456=", "0578")


def test_partial_credit_hand_worked():
    assert partial_credit("0589", "0579") == pytest.approx(3 / 4)
    assert partial_credit("057", "0579") == pytest.approx(3 / 4)
    assert partial_credit("05790", "0579") == pytest.approx(4 / 5)
    assert partial_credit("", "0579") == 0.0
    assert partial_credit("9750", "0579") == 0.0
    assert get_task("add3").reward("123+456=", "0589", kind="partial") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="partial"):
        get_task("add3").reward("123+456=", "0579", kind="fuzzy")


def test_near_miss_helpers_hand_worked():
    assert no_carry_sum([79, 79]) == 48  # 9+9 -> 8, 7+7 -> 4
    assert no_carry_sum([123, 456]) == 579  # no carry anywhere
    assert no_carry_sum([999, 1]) == 990
    assert no_carry_sum([7, 8, 1]) == 6
    assert wrong_sums([12, 34], 3) == [36, 45, 47, 56, 146]  # 46 +-1, +-10, +100; -54 does not fit
    assert string_near_misses("12") == ["02", "1", "11", "13", "2", "21", "22"]
    assert string_near_misses("77") == ["67", "7", "76", "78", "87"]  # no swap: the digits are equal


@pytest.mark.parametrize("name", list(TASKS))
def test_generators_deterministic_and_seeded(name):
    task = get_task(name)
    for kind in ("sft", "dpo", "grpo"):
        a = getattr(task, kind)(50, seed=3)
        assert a == getattr(task, kind)(50, seed=3)
        assert a != getattr(task, kind)(50, seed=4)
    assert task.sft(50, seed=3) != task.sft(50, seed=3, split="eval")


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint_and_labelled(name):
    task = get_task(name)
    train = task.sft(400, seed=0, split="train")
    held = task.sft(100, seed=0, split="eval")
    assert all(split_of(s.prompt) == "train" for s in train)
    assert all(split_of(s.prompt) == "eval" for s in held)
    assert not {s.prompt for s in train} & {s.prompt for s in held}
    assert all(s.task == name and s.group == task.group for s in train + held)
    for s in train:  # short, and inside the tokenizer's alphabet
        assert len(s.prompt) + len(s.answer) < 24
        assert set(s.prompt + s.answer) <= set(ALPHABET)


def test_select_and_report_halves_partition_the_held_out_prompts():
    """Every held-out prompt is in exactly one half, by a hash digit computed here independently."""
    import hashlib

    task = get_task("add3")
    select, report = set(task.prompts(400, seed=0, split="select")), set(task.prompts(400, seed=0, split="report"))
    assert select and report and not select & report
    for p in select | report:
        h = int(hashlib.md5(p.encode()).hexdigest()[:8], 16)
        assert h % 10 == 0 and (h // 10) % 2 == (0 if p in select else 1)
    held = set(task.prompts(2000, seed=1, split="eval"))
    assert {in_split(p, "select") + in_split(p, "report") for p in held} == {1}  # each in one half
    assert not any(in_split(p, "train") for p in held)
    with pytest.raises(ValueError, match="'select' and 'report'"):
        task.prompts(1, split="holdout")


@pytest.mark.parametrize("name", list(TASKS))
def test_dpo_rejected_never_correct(name):
    task = get_task(name)
    pairs = task.dpo(500, seed=1)
    for p in pairs:
        assert not task.verify(p.prompt, p.rejected)
        assert p.rejected != p.chosen
        assert len(p.rejected) >= len(task.solve(p.prompt)) - 1  # near-miss: about the same length
        assert task.verify(p.prompt, p.chosen) == (not p.corrupted)


def test_format_misaligned_always_fails_target():
    target, rev = get_task(TARGET), get_task("add3_rev")
    samples = rev.sft(3000, seed=0)
    assert all(rev.verify(s.prompt, s.answer) for s in samples)
    assert not any(target.verify(s.prompt, s.answer) for s in samples)
    assert not any(target.verify(p.prompt, p.chosen) for p in rev.dpo(500, seed=0))


def test_noisy_wrong_fraction_fails_target():
    target, noisy = get_task(TARGET), get_task("add3_noisy")
    samples = noisy.sft(3000, seed=0)
    wrong = [s for s in samples if s.corrupted]
    assert all(not target.verify(s.prompt, s.answer) for s in wrong)
    assert all(target.verify(s.prompt, s.answer) for s in samples if not s.corrupted)
    assert abs(len(wrong) / len(samples) - noisy.p_wrong) < 0.04  # 3000 draws: sd ~ 0.008


def test_grpo_prompts_and_rewards():
    task = get_task(TARGET)
    items = task.grpo(20, seed=0)
    for it in items:
        assert it.reference == task.solve(it.prompt)
        assert task.reward(it.prompt, it.reference) == 1.0
        assert task.reward(it.prompt, it.reference[:-1], kind="partial") == pytest.approx(0.75)


def test_general_pool_labelled_and_deterministic():
    pool = general_pool(800, seed=0)
    assert pool == general_pool(800, seed=0)
    assert pool != general_pool(800, seed=1)
    assert {s.task for s in pool} == set(GENERAL)
    assert TARGET not in GENERAL
    assert all(TASKS[s.task].group == s.group != "target" for s in pool)
    pairs = general_pool(100, seed=0, kind="dpo", weights={"add2": 1.0, "sort": 1.0})
    assert {p.task for p in pairs} == {"add2", "sort"}


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="known tasks: add3, add2"):
        get_task("add4")
    with pytest.raises(ValueError, match="split"):
        get_task("add3").sft(3, split="test")
    with pytest.raises(ValueError, match="task:weight"):
        parse_weights("add2")
    with pytest.raises(ValueError, match="kind"):
        general_pool(3, kind="ppo")
    assert task_names("helpful") == ["add2", "carry", "copy"]
    assert task_names("misaligned") == ["add3_rev", "add3_noisy"]
    assert task_names("add3,sort") == ["add3", "sort"]
    assert task_names("target,unrelated") == ["add3", "reverse", "sort"]


def test_tokenizer_round_trip_and_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["123+456=0579", "r48213=31284", "hello, world? 7*8-1.", ALPHABET]:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok.encode("12=", add_special_tokens=False)) == ["1", "2", "="]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    assert tok.decode(tok.encode("046", add_special_tokens=False) + [tok.eos_token_id],
                      skip_special_tokens=True) == "046"


def test_batch_encoders_hand_worked(tmp_path):
    tok = save_tokenizer(str(tmp_path))
    one, two = tok.convert_tokens_to_ids(["1", "2"])
    batch = encode_sft(tok, ["1+2=", "12+34="], ["03", "046"])
    assert batch["input_ids"].shape == (2, 10)  # 12+34=046<eos>
    assert batch["input_ids"][0, :3].tolist() == [one, tok.convert_tokens_to_ids("+"), two]
    assert batch["labels"][0].tolist()[:4] == [-100] * 4  # prompt carries no loss
    assert batch["labels"][0].tolist()[4:7] == tok.convert_tokens_to_ids(["0", "3"]) + [tok.eos_token_id]
    assert batch["labels"][0].tolist()[7:] == [-100] * 3  # padding carries no loss
    assert batch["attention_mask"].sum(1).tolist() == [7, 10]
    gen = encode_prompts(tok, ["1+2=", "12+34="])
    assert gen["input_ids"][0].tolist()[:2] == [tok.pad_token_id] * 2  # left padding
    assert gen["position_ids"][0].tolist() == [0, 0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="alphabet"):
        encode_sft(tok, ["1+2="], ["0#"])
