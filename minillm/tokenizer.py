"""Tokenizer: a sentencepiece BPE model with byte fallback, plus the one chat template.

Lossless by construction: identity normalisation, extra whitespace kept, no dummy prefix, byte fallback, so
any UTF-8 text (Chinese, full-width punctuation, emoji, newlines, runs of spaces) decodes to itself.
Special ids are fixed: 0 <pad>, 1 <unk>, 2 <s>, 3 </s>, 4 <|im_start|>, 5 <|im_end|>. The chat markers are
sentencepiece *control* symbols: only `apply_chat_template` inserts them by id; the same text typed by a user
encodes as ordinary pieces and cannot end a turn.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import sentencepiece as spm

log = logging.getLogger(__name__)

MODEL_FILE = "tokenizer.model"
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TRAINER_VERSION = 1  # bump when the training recipe below changes: cached tokenizers are then retrained


@dataclass
class TokenizerConfig:
    """How to train the tokenizer. Also the Hydra schema of the `tokenizer` group."""

    vocab_size: int = 8192
    character_coverage: float = 0.9995  # rarer characters are spelled with byte pieces
    max_sentences: int = 2_000_000  # lines sampled for training (sentencepiece's input_sentence_size)
    max_chars: Optional[int] = None  # read only the first max_chars characters of the corpus (huge sets); None: all
    cache_dir: str = "data/tokenizers"
    retrain: bool = False  # overwrite a cached tokenizer with the same key

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError(f"tokenizer.vocab_size must be >= 300 (256 byte pieces + specials), got {self.vocab_size}")


class Tokenizer:
    """Encode/decode with a trained sentencepiece model; knows its special ids and its own sha256."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path / MODEL_FILE if path.is_dir() else path
        if not self.path.is_file():
            raise FileNotFoundError(
                f"no tokenizer model at {self.path}: train one or point at a folder with {MODEL_FILE}"
            )
        try:
            self._load(self.path.read_bytes())
        except RuntimeError as e:  # sentencepiece's parse error
            folder = self.path.parent
            in_model = (folder / "minillm.json").is_file() or (folder / "model.safetensors").is_file()
            todo = (  # a model's own tokenizer cannot be retrained: its weights were trained on those ids
                "copy it back from the run that trained the model (<run_dir>/checkpoints/tokenizer.model) or export "
                "the model again"
                if in_model
                else "restore it from the run it came with, or retrain the tokenizer (tokenizer.retrain=true)"
            )
            raise ValueError(
                f"{self.path} is not a valid sentencepiece model ({str(e).splitlines()[0][:120]}); {todo}"
            ) from None

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.sha256 = hashlib.sha256(proto).hexdigest()
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        self.im_start_id, self.im_end_id = self.sp.piece_to_id(IM_START), self.sp.piece_to_id(IM_END)
        if self.im_end_id == self.sp.unk_id():
            raise ValueError(f"{self.path} has no {IM_END} control symbol: it was not trained by minillm")

    def __getstate__(self) -> dict:  # for worker processes (tokenization with num_proc > 1)
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._load(state["proto"])

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. `add_special_tokens` is taken for transformers' signature: this tokenizer adds no
        BOS or EOS either way (its exported tokenizer_config.json says the same), so both give the same ids."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; control tokens (padding, </s>, the chat markers) decode to nothing either way."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_bytes(self._proto)
        return directory / MODEL_FILE

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


class EmptyCorpusError(ValueError):
    pass


def train_tokenizer(lines: Iterable[str], out_dir: str | Path, config: TokenizerConfig) -> Tokenizer:
    """Train a BPE tokenizer on an iterable of text lines and save `tokenizer.model` in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    seen: list[int] = [0]
    raised: list[Exception] = []

    def counted(lines: Iterable[str]) -> Iterator[str]:  # sentencepiece turns our errors into a bare RuntimeError
        try:
            for line in lines:
                seen[0] += 1
                yield line
        except Exception as e:
            raised.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(lines),
            model_writer=proto,
            model_type="bpe",
            vocab_size=config.vocab_size,
            character_coverage=config.character_coverage,
            input_sentence_size=config.max_sentences,
            shuffle_input_sentence=True,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=1 << 16,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=SPECIAL_TOKENS["pad"],
            unk_piece=SPECIAL_TOKENS["unk"],
            bos_piece=SPECIAL_TOKENS["bos"],
            eos_piece=SPECIAL_TOKENS["eos"],
            control_symbols=[IM_START, IM_END],
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        if raised:  # a data error (file:line) raised while reading: that is the message
            raise raised[0] from None
        if seen[0] == 0:
            raise EmptyCorpusError("no text to train the tokenizer on") from None
        raise ValueError(
            f"tokenizer training failed: {e}\nAdjust tokenizer.vocab_size (or tokenizer.character_coverage) "
            "as sentencepiece says above"
        ) from e
    (out_dir / MODEL_FILE).write_bytes(proto.getvalue())
    return Tokenizer(out_dir)


def corpus_fingerprint(files: list) -> str:
    """Of the corpus content: each file's bytes, or a dataset source's own `fingerprint()`."""
    h = hashlib.sha256()
    for f in sorted(files, key=str):
        if isinstance(f, Path):
            h.update(f.name.encode())
            content = hashlib.sha256()
            with f.open("rb") as stream:  # in chunks: a corpus file may be larger than memory
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    content.update(chunk)
            h.update(content.digest())
        else:
            h.update(f.fingerprint().encode())
    return h.hexdigest()


def get_tokenizer(files: list[Path], config: TokenizerConfig, lines: Callable[[], Iterable[str]]) -> Tokenizer:
    """The tokenizer for these corpus files and settings: from the cache when trained before, else trained now
    on `lines()` (the data side reads the files: minillm/data/datamodule.py `corpus_tokenizer`).

    The cache key is (corpus content, vocab size, settings, trainer version), so changing any of them trains
    a new tokenizer in a new folder and ids never change under existing weights.
    """
    if not files:
        raise FileNotFoundError("no corpus files given to train the tokenizer on")
    settings = {k: v for k, v in asdict(config).items() if k not in ("cache_dir", "retrain")}
    if settings["max_chars"] is None:  # keys of tokenizers trained before the setting existed stay valid
        del settings["max_chars"]
    key_src = json.dumps({"corpus": corpus_fingerprint(files), "settings": settings, "v": TRAINER_VERSION})
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out_dir = Path(config.cache_dir) / f"bpe{config.vocab_size}-{key}"
    if (out_dir / MODEL_FILE).is_file() and not config.retrain:
        log.info("tokenizer: reusing %s", out_dir)
        return Tokenizer(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    log.info("tokenizer: training vocab %d on %d files -> %s", config.vocab_size, len(files), out_dir)
    tok = train_tokenizer(lines(), out_dir, config)
    (out_dir / "tokenizer_train.json").write_text(
        json.dumps(json.loads(key_src) | {"files": [str(f) for f in files]}, indent=2)
    )
    return tok


@dataclass
class ChatEncoding:
    ids: list[int]
    assistant_mask: list[int] = field(default_factory=list)  # 1 on tokens the assistant wrote (and its <|im_end|>)


ROLES = ("system", "user", "assistant", "tool")  # tool: a tool's output, rendered like any turn, never trained on
# The one chat template (ChatML), in the two forms it is needed in: `chat_turns` below, which
# `apply_chat_template` encodes with the markers inserted by id, and the same layout as Jinja for the
# tokenizer_config.json of an export (transformers' apply_chat_template). A test renders both and compares.
TURN_END = "\n"  # after each message's <|im_end|>
CHAT_TEMPLATE = (
    f"{{% for message in messages %}}{{{{ '{IM_START}' + message['role'] + '\\n' + message['content'] + "
    f"'{IM_END}' + '\\n' }}}}{{% endfor %}}{{% if add_generation_prompt %}}{{{{ '{IM_START}assistant\\n' }}}}"
    "{% endif %}"
)


def chat_turns(messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, str, str]]:
    """(header, content, end) text per turn: `<|im_start|>{role}\\n`, the content, `<|im_end|>\\n`; with
    add_generation_prompt a last turn `<|im_start|>assistant\\n` with no content or end."""
    turns = [(f"{IM_START}{m['role']}\n", m["content"], f"{IM_END}{TURN_END}") for m in messages]
    return turns + ([(f"{IM_START}assistant\n", "", "")] if add_generation_prompt else [])


def apply_chat_template(
    tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False
) -> ChatEncoding:
    """ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, markers inserted by id (a Hugging Face
    tokenizer.json renders the folder's own template instead: minillm.hf_tokenizer).

    The assistant mask is 1 on each assistant message's content and its closing <|im_end|> (what SFT learns
    to write), 0 on headers, user/system text and the newline after each turn. With add_generation_prompt the
    ids end with `<|im_start|>assistant\\n`, ready for generation.
    """
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
    if not isinstance(tokenizer, Tokenizer):  # a Hugging Face tokenizer renders its own template
        return tokenizer.chat(messages, add_generation_prompt)
    ids: list[int] = []
    mask: list[int] = []
    roles = [m["role"] for m in messages] + ["assistant"]
    for role, (header, content, end) in zip(roles, chat_turns(messages, add_generation_prompt)):
        header_ids = [tokenizer.im_start_id] + tokenizer.encode(header.removeprefix(IM_START))
        end_ids = [tokenizer.im_end_id] if end else []
        body = (tokenizer.encode(content) if content else []) + end_ids  # what the assistant writes, with its end
        after = tokenizer.encode(end.removeprefix(IM_END)) if end else []
        learn = 1 if role == "assistant" else 0
        ids += header_ids + body + after
        mask += [0] * len(header_ids) + [learn] * len(body) + [0] * len(after)
    return ChatEncoding(ids=ids, assistant_mask=mask)
