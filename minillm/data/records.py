"""Reading records from data files, one line at a time, with errors that name the file and the line.

`.jsonl`: one JSON object per line (blank lines skipped). `.txt`: paragraphs (blank-line separated) joined into
records of at most ~4000 characters. A JSON array file, a malformed line or a record without the expected field
is a `DataError` naming file:line, or — with `data.skip_bad_records=true` — skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterable, Iterator
from pathlib import Path

from minillm.tokenizer import ROLES

TXT_RECORD_CHARS = 4000


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what to do."""


def chunk_paragraphs(paragraphs: Iterable[str], max_chars: int) -> Iterator[str]:
    """Join consecutive paragraphs (blank line between) into pieces of at most ~max_chars."""
    piece: list[str] = []
    size = 0
    for p in paragraphs:
        if piece and size + len(p) > max_chars:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(p)
        size += len(p) + 2
    if piece:
        yield "\n\n".join(piece)


def _txt_paragraphs(path: Path, bad: BadRecords) -> Iterator[str]:
    """Blank-line separated paragraphs. Lines are decoded one by one, so a non-UTF-8 byte is reported (or
    skipped) at its line."""
    block: list[str] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                bad(path, lineno, f"not UTF-8 (byte {e.start} of the line: {e.reason}); re-encode the file as UTF-8")
                continue
            if line.strip():
                block.append(line)
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


class BadRecords:
    """Counts skipped records per file (for dataset_stats.json) or raises, depending on skip_bad_records."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.counts: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def __call__(self, path: Path, lineno: int, problem: str) -> None:
        """`path`: a file (`lineno` its line) or a dataset source (`lineno` its row index)."""
        where = f"{path}:{lineno}" if isinstance(path, Path) else f"{path}, row {lineno}"
        if not self.skip:
            raise DataError(f"{where}: {problem}. Fix the record, or set data.skip_bad_records=true to skip such lines")
        self.counts[str(path)] = self.counts.get(str(path), 0) + 1
        self.examples.setdefault(str(path), f"{where}: {problem}")


def a_type(value: object) -> str:
    """'a list', 'an int': the JSON-ish type of a value, with its article."""
    name = {"str": "string", "dict": "object", "list": "list", "NoneType": "null"}.get(type(value).__name__)
    name = name or type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def json_array_hint(path: Path) -> str:
    """The error for a .jsonl holding one JSON array, with a conversion command that is safe to run as printed:
    it writes the lines to a new file first and keeps the array file as a backup (it never reads and writes the
    same path, which would empty it)."""
    name = path.name
    backup, lines = f"{name}.array.bak", f"{name}.lines.tmp"
    code = "import json,sys; [print(json.dumps(r, ensure_ascii=False)) for r in json.load(open(sys.argv[1]))]"
    command = (
        f"cd {shlex.quote(str(path.parent))} && python -c '{code}' {shlex.quote(name)} > {shlex.quote(lines)} && "
        f"mv {shlex.quote(name)} {shlex.quote(backup)} && mv {shlex.quote(lines)} {shlex.quote(name)}"
    )
    return (
        f"{path}:1: this looks like a JSON array; JSON Lines is expected (one object per line). This command "
        f"writes the records as lines to a new file, keeps the array as {backup} (not read as data) and puts the "
        f"lines in place of {name}:\n  {command}"
    )


def read_jsonl(path: Path, bad: BadRecords) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line. Lines are decoded one by one, so a non-UTF-8 byte is
    reported at its line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(path, lineno, f"not UTF-8 (byte {e.start} of the line: {e.reason}); re-encode the file as UTF-8")
                continue
            stripped = line.strip()
            if not stripped:
                continue
            if lineno == 1 and stripped.startswith("["):
                raise DataError(json_array_hint(path))
            try:
                obj = json.loads(stripped)
            except json.JSONDecodeError as e:
                bad(path, lineno, f"invalid JSON at column {e.colno} ({e.msg.removesuffix(' at')})")
                continue
            if not isinstance(obj, dict):
                bad(path, lineno, f"expected a JSON object, got {a_type(obj)}")
                continue
            yield lineno, obj


def to_text(obj: dict, field: str = "text") -> dict | str:
    """A pretraining record as {"text": str}, or what is wrong with it."""
    text = obj.get(field)
    if not isinstance(text, str):
        got = "missing" if text is None else a_type(text)
        return f'field "{field}" must be a string, it is {got} (keys: {sorted(obj)[:8]})'
    return {"text": text}


def read_texts(path: Path, bad: BadRecords, field: str = "text") -> Iterator[str]:
    """The pretraining texts of a .jsonl ({"text": ...}) or .txt file."""
    if path.suffix == ".txt":
        yield from chunk_paragraphs(_txt_paragraphs(path, bad), TXT_RECORD_CHARS)
        return
    for lineno, obj in read_jsonl(path, bad):
        record = to_text(obj, field)
        if isinstance(record, str):
            bad(path, lineno, record)
            continue
        if record["text"]:
            yield record["text"]


def record_fraction(record: object, salt: str) -> float:
    """A stable number in [0, 1) from the record's content: used to split and to sample deterministically."""
    payload = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False, sort_keys=True)
    digest = hashlib.sha256(f"{salt}\0{payload}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(record: object, ratio: float) -> bool:
    """Validation split by content hash: adding records never moves existing ones between splits."""
    return record_fraction(record, "val") < ratio


def is_sampled(record: object, ratio: float, offset: float = 0.0) -> bool:
    """Whether a record is in the sample: its hash fraction falls in [offset, offset + ratio) (wrapping at 1), so
    ratio 0.5 at offsets 0 and 0.5 are disjoint halves."""
    return ratio >= 1.0 or (record_fraction(record, "sample") - offset) % 1.0 < ratio


# ShareGPT's speaker names ("from") -> our roles
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "function_call": "assistant",  # the assistant calling a tool
    "tool": "tool",
    "function": "tool",
    "observation": "tool",  # what the tool returned
}


def _sharegpt(turns: list) -> list | str:
    """ShareGPT turns ({"from", "value"}) as messages, or what is wrong with them."""
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t:
            return f"message {i}: a ShareGPT turn needs from and value"
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            return f"message {i} has unknown speaker {t['from']!r}; ShareGPT speakers are {', '.join(SHAREGPT_ROLES)}"
        messages.append({"role": role, "content": t.get("value")})
    return messages


def _turns(value, role: str) -> list | None:
    """A prompt or completion of TRL's prompt-completion format: a string (one `role` message) or messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return list(value) if isinstance(value, list) else None


def to_messages(obj: dict) -> list[dict] | str:
    """A chat record in any supported format as [{"role", "content"}, ...], or what is wrong with it.

    Formats: minimind {"conversations": [...]}, OpenAI/TRL {"messages": [...]}, ShareGPT {"conversations":
    [{"from": "human"|"gpt"|"system"|"tool"|..., "value"}]}, TRL prompt-completion {"prompt", "completion"}
    (strings, or message lists: the conversation is the prompt followed by the completion), Alpaca
    {"instruction", "input", "output"} and {"prompt", "response"}. Roles: system, user, assistant, tool (a tool's
    output: in the context, never a training target).
    """
    if "conversations" in obj or "messages" in obj:
        messages = obj.get("conversations", obj.get("messages"))
        if isinstance(messages, list) and messages and isinstance(messages[0], dict) and "from" in messages[0]:
            messages = _sharegpt(messages)
            if isinstance(messages, str):
                return messages
    elif "prompt" in obj and "completion" in obj:
        prompt, completion = _turns(obj["prompt"], "user"), _turns(obj["completion"], "assistant")
        if prompt is None or completion is None:
            return "prompt and completion must each be a string or a list of messages"
        messages = prompt + completion
    elif "instruction" in obj and "output" in obj:
        user = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]
    elif "prompt" in obj and "response" in obj:
        messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    else:
        return (
            "no chat fields: expected conversations, messages, prompt+completion, instruction+output or "
            f"prompt+response (keys: {sorted(obj)[:8]})"
        )
    if not isinstance(messages, list) or not messages:
        return "the conversation is empty"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            return f"message {i} has unknown role {role!r}; roles are {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"message {i} ({m['role']}): content must be a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "the conversation has no assistant message to learn from"
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _read_normalised(path: Path, bad: BadRecords, normalise) -> Iterator[str]:
    """The JSON text of each record `normalise` accepts; the problem it names otherwise goes to `bad`."""
    for lineno, obj in read_jsonl(path, bad):
        record = normalise(obj)
        if isinstance(record, str):
            bad(path, lineno, record)
            continue
        yield json.dumps(record, ensure_ascii=False)


def to_sft_record(obj: dict) -> list[dict] | dict | str:
    """An SFT record: a conversation (`to_messages`) or, with a "text" field and no chat fields, plain text
    {"text": str} that SFT learns on every token as pretraining does (pretraining text mixed into SFT keeps the
    language model under the chat model)."""
    if "text" in obj and not any(k in obj for k in CHAT_FIELDS):
        return to_text(obj)
    record = to_messages(obj)
    if isinstance(record, str) and record.startswith("no chat fields"):
        return record.replace("expected ", 'expected text (plain text), ', 1)
    return record


CHAT_FIELDS = ("conversations", "messages", "prompt", "instruction")


def read_conversations(path: Path, bad: BadRecords) -> Iterator[str]:
    """Each valid record of a .jsonl SFT file: the JSON text of its message list, or of {"text"} for plain
    text (`to_sft_record`)."""
    return _read_normalised(path, bad, to_sft_record)


def to_preference(obj: dict) -> dict | str:
    """A preference record as {"prompt": [messages], "chosen": str, "rejected": str}, or what is wrong with it.

    Formats: minimind {"chosen": [messages], "rejected": [messages]} (a shared conversation whose last
    assistant message differs) and TRL {"prompt", "chosen", "rejected"}, each a string or a message list.
    """
    if "chosen" not in obj or "rejected" not in obj:
        return f"a preference pair needs chosen and rejected (keys: {sorted(obj)[:8]})"

    def completion(value) -> str | None:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
            return value[-1].get("content") if isinstance(value[-1].get("content"), str) else None
        return None

    if "prompt" in obj:
        prompt = obj["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    else:  # minimind: the prompt is the conversation before the last message, identical on both sides
        chosen, rejected = obj["chosen"], obj["rejected"]
        if not (isinstance(chosen, list) and isinstance(rejected, list)) or chosen[:-1] != rejected[:-1]:
            return "without a prompt field, chosen and rejected must be conversations that differ only at the end"
        prompt = chosen[:-1]
    checked = to_messages({"messages": list(prompt) + [{"role": "assistant", "content": "x"}]})
    if isinstance(checked, str):
        return f"prompt: {checked}"
    chosen, rejected = completion(obj["chosen"]), completion(obj["rejected"])
    if chosen is None or rejected is None:
        return "chosen and rejected must be strings or conversations ending with an assistant message"
    if not chosen.strip() or not rejected.strip():
        return "empty completion"
    if chosen == rejected:
        return "chosen and rejected are the same"
    return {"prompt": checked[:-1], "chosen": chosen, "rejected": rejected}


def read_preferences(path: Path, bad: BadRecords) -> Iterator[str]:
    """Each valid preference pair of a .jsonl file, as the JSON text of {"prompt", "chosen", "rejected"}."""
    return _read_normalised(path, bad, to_preference)


def to_prompt(obj: dict) -> dict | str:
    """An RL prompt record as {"prompt": [messages], **other fields}, or what is wrong with it.

    Formats: {"prompt": str | [messages]} (a TRL prompt dataset; a preference pair is one too) and any chat
    record, whose conversation up to its last assistant message is the prompt (and that message the `answer`
    unless the record has one). Other top-level fields (`answer`, `sentiment`, `task`, ...) travel with the
    prompt: rule-based reward functions read them.
    """
    extras = {k: v for k, v in obj.items() if k not in ("prompt", "conversations", "messages", "chosen", "rejected")}
    if "prompt" in obj:
        prompt = obj["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(prompt, list):
            return "prompt must be a string or a list of messages"
        checked = to_messages({"messages": list(prompt) + [{"role": "assistant", "content": "x"}]})
        if isinstance(checked, str):
            return f"prompt: {checked}"
        messages = checked[:-1]
    else:
        checked = to_messages(obj)
        if isinstance(checked, str):
            return f"not a prompt record: needs a prompt field or a conversation ({checked})"
        last = max(i for i, m in enumerate(checked) if m["role"] == "assistant")
        messages = checked[:last]
        extras.setdefault("answer", checked[last]["content"])
    if not messages or messages[-1]["role"] == "assistant":
        return "the prompt must end with a user (or system) message"
    return {"prompt": messages, **extras}


def read_prompts(path: Path, bad: BadRecords) -> Iterator[str]:
    """Each valid RL prompt of a .jsonl file, as the JSON text of {"prompt": [messages], ...}."""
    return _read_normalised(path, bad, to_prompt)
