"""A prompt and its completions as token ids, with any Hugging Face tokenizer: plain text or chat messages.

This is what turns one row of a data file (data/files.py) into the ids of a unit. The training row of a
(prompt, completion) is `prompt ids + completion ids + <eos>` (eq. (1) in theory/own_data.md): the two
parts are encoded separately and concatenated, exactly as at sampling time (the prompt is encoded, the
completion is generated after it), so a GRPO row, an SFT row and a greedy evaluation see the same prompt ids.

    prompt_ids(tok, prompt)                  text: tok(prompt) with the tokenizer's own start tokens (a
                                             trailing eos removed); messages: the chat template with the
                                             generation prompt, eq. (2)
    completion_ids(tok, prompt, completion)  text: tok(completion), nothing added; messages: the template of
                                             prompt + completion minus the template of the prompt, cut
                                             before its last eos (the encoders add <eos> back), eq. (3)
    truncate(prompt, completions, max_length)   the rule of eq. (4): prompt cut from the left, completions
                                             from the right

A value is text (str) or messages (a list of {"role", "content"} dicts, TRL's conversational format). A
text completion after a messages prompt is read as one assistant message.

Shapes: no tensors; ids are lists of ints, prompt (P,), completion (C,); a row is P + C + 1 tokens.
"""

from __future__ import annotations


def is_messages(value) -> bool:
    """Whether `value` is a conversation: a non-empty list of dicts with a role and a content."""
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value))


def check_value(value, what: str) -> None:
    """Refuse a value that is neither text nor messages (ValueError naming `what`: the file, row and column)."""
    if not (isinstance(value, str) or is_messages(value)):
        raise ValueError(f"{what}: {type(value).__name__} {str(value)[:60]!r} is neither text nor a list of "
                         "{'role', 'content'} messages (TRL's formats); fix the row.")


def _template(tok, messages: list, generation_prompt: bool, what: str) -> str:
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{what} holds chat messages but the --model folder's tokenizer has no chat template; "
                         "give the prompt and completion as text, or add \"chat_template\" to its "
                         "tokenizer_config.json.")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tok, text: str, special: bool) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def prompt_ids(tok, prompt, what: str = "prompt") -> list[int]:
    """The ids of a prompt, eq. (2) in theory/own_data.md. Text: the tokenizer's own start tokens (Llama's
    <s>, nothing for GPT-2), then the text, a trailing eos some tokenizers add removed; messages: the chat
    template with the generation prompt (the template writes its own start tokens). ValueError when empty."""
    check_value(prompt, what)
    if isinstance(prompt, str):
        ids = _ids(tok, prompt, special=True)
        if ids and ids[-1] == tok.eos_token_id and len(ids) > 1:
            ids = ids[:-1]
    else:
        ids = _ids(tok, _template(tok, prompt, True, what), special=False)
    if not ids:
        raise ValueError(f"{what} encodes to no tokens; a unit needs at least one prompt token (the first token "
                         "has no prediction): fix the row.")
    return ids


def completion_ids(tok, prompt, completion, what: str = "completion") -> list[int]:
    """The ids of a completion after `prompt`, without the final <eos> (the row encoders add it), eq. (3).

    Text after a text prompt: tok(completion), nothing added. Messages (or text after a messages prompt):
    T(prompt + completion) minus T(prompt, generation prompt) as text, then encoded, then cut before its
    last eos (what follows the eos, e.g. Qwen's newline after <|im_end|>, is never generated). ValueError
    when the template of the whole does not start with the template of the prompt."""
    check_value(completion, what)
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise ValueError(f"{what} holds chat messages after a text prompt; give both as messages or both as "
                             "text.")
        return _ids(tok, completion, special=False)
    messages = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
    head = _template(tok, prompt, True, what)
    whole = _template(tok, list(prompt) + list(messages), False, what)
    if not whole.startswith(head):
        raise ValueError(f"{what}: the chat template of prompt + completion does not start with the template of "
                         "the prompt (with its generation prompt), so the completion's tokens cannot be told "
                         "apart; use text columns or a template that renders turns independently.")
    ids = _ids(tok, whole[len(head):], special=False)
    eos = tok.eos_token_id
    if eos in ids:
        ids = ids[:len(ids) - 1 - ids[::-1].index(eos)]  # before the last eos, eq. (3)
    return ids


def truncate(prompt: list[int], completions: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]]]:
    """Cut the rows prompt + completion + <eos> to at most `max_length` tokens, eq. (4) in theory/own_data.md.

    The completions (all of one unit: an SFT answer, a DPO pair) keep at least max_length // 2 tokens
    (with <eos>), from their START: the loss of a completion's first tokens is what its prompt conditions
    most, and a tail cut off loses only tokens after them. The prompt keeps the rest, from its END: the
    tokens next to the completion (and a chat template's generation prompt) matter most, its beginning
    least. A cut completion still ends in <eos> (scored as if it stopped, like a sampled completion that hit
    --max-new-tokens). Rows that fit are unchanged. prompt (P,), completions k x (C_i,) -> the same, cut."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be >= 2 (one prompt token, then <eos>)")
    longest = max(len(c) for c in completions) + 1  # + <eos>
    if len(prompt) + longest <= max_length:
        return prompt, completions
    keep_completion = max(max_length - len(prompt), max_length // 2)  # tokens of a row's completion, <eos> included
    completions = [c[:keep_completion - 1] for c in completions]
    keep_prompt = max_length - (max(len(c) for c in completions) + 1)  # >= max_length - max_length // 2 >= 1
    return prompt[len(prompt) - keep_prompt:], completions
