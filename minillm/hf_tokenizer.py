"""A Hugging Face `tokenizer.json` tokenizer (SmolLM2, Qwen2.5, TinyLlama, ...) behind the interface of
minillm.tokenizer.Tokenizer, with the folder's own chat template (the `hf` extra: the `tokenizers` library).

- ids and decoding: `tokenizers` on tokenizer.json. `encode` adds no BOS or EOS (as ours); text that spells a
  special token (`<|im_end|>`) encodes as that token, as transformers encodes a rendered template;
- bos / eos / pad: tokenizer_config.json (strings or added-token dicts); eos falls back to generation_config.json;
  pad to eos (what these models are fine-tuned with);
- the chat template: tokenizer_config.json's `chat_template` (or chat_template.jinja), rendered with jinja2 in a
  sandbox with the variables transformers passes (messages, add_generation_prompt, bos_token, eos_token,
  raise_exception);
- the assistant mask, by rendering prefixes: for each assistant message, the text of the conversation before it
  with the generation prompt must be a prefix of the text through it, which must be a prefix of the whole; the
  characters between the two (the reply and its end-of-turn marker, without the whitespace after it) are the
  assistant's, and so are the tokens that start there. A template that does not render that way is refused,
  naming the message — it works for templates without generation markers, as most are.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from minillm.tokenizer import MODEL_FILE, ChatEncoding, Tokenizer

JSON_FILE = "tokenizer.json"
COPIED = (JSON_FILE, "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class TemplateError(ValueError):
    pass


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an added-token dict."""
    return token.get("content") if isinstance(token, dict) else token


class HFTokenizer:
    def __init__(self, folder: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as Backend
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                f"{folder} holds a tokenizer.json: reading it needs the `tokenizers` library "
                "(pip install 'minillm-lab[hf]'; in a checkout: -e '.[hf]')"
            ) from None
        self.folder = Path(folder)
        self.path = self.folder / JSON_FILE
        self.backend = Backend.from_file(str(self.path))
        config = _read_json(self.folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (self.folder / "chat_template.jinja").is_file():
            template = (self.folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.template_source: str | None = template
        self.bos_token, self.eos_token = _content(config.get("bos_token")), _content(config.get("eos_token"))
        generation = _read_json(self.folder / "generation_config.json")
        eos = generation.get("eos_token_id")
        self.bos_id = self._id(self.bos_token)
        self.eos_id = self._id(self.eos_token)
        if self.eos_id is None and eos is not None:
            self.eos_id = eos[0] if isinstance(eos, list) else eos
        if self.eos_id is None:
            raise ValueError(f"{self.folder}: no eos_token in tokenizer_config.json nor generation_config.json")
        self.eos_token = self.eos_token or self.backend.id_to_token(self.eos_id)
        pad = self._id(_content(config.get("pad_token")))
        self.pad_id = self.eos_id if pad is None else pad
        digest = hashlib.sha256(self.path.read_bytes())
        digest.update((template or "").encode())
        self.sha256 = digest.hexdigest()
        self._compiled = None
        self.im_start_id = self._id("<|im_start|>")
        self.im_end_id = self._end_of_turn()

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def __getstate__(self) -> dict:  # worker processes rebuild it from the folder
        return {"folder": str(self.folder)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, no BOS or EOS added (either way, as minillm.tokenizer.Tokenizer)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (the chat markers, eos, padding) decode to nothing, as with ours."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.backend.id_to_token(int(i))

    def save(self, directory: str | Path) -> Path:
        """Copy the tokenizer's own files (tokenizer.json, its config with the template, ...) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in COPIED:
            if (self.folder / name).is_file() and (self.folder / name).resolve() != (directory / name).resolve():
                shutil.copyfile(self.folder / name, directory / name)
        return directory / JSON_FILE

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"

    # ---- the chat template ----
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.template_source is None:
            raise TemplateError(
                f"{self.folder} has no chat template (tokenizer_config.json's chat_template or chat_template.jinja): "
                "chat, SFT and preference data need one; add it to tokenizer_config.json"
            )
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._compiled = env.from_string(self.template_source)

        def raise_exception(message):
            raise TemplateError(f"the chat template of {self.folder} refused the conversation: {message}")

        return self._compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            raise_exception=raise_exception,
        )

    def assistant_spans(self, messages: list[dict], text: str) -> list[tuple[int, int]]:
        """(start, end) characters of each assistant message in `text` (the render of all of them), by rendering
        prefixes (module docstring)."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise TemplateError(
                    f"the chat template of {self.folder} renders message {i} (assistant) so that the conversation "
                    "before it is not a prefix of the conversation through it: its tokens cannot be told apart for "
                    "the loss mask. Use a template that renders turns in order"
                )
            spans.append((len(before), len(through.rstrip())))
        return spans

    def chat(self, messages: list[dict], add_generation_prompt: bool = False) -> ChatEncoding:
        text = self.render(messages, add_generation_prompt)
        encoding = self.backend.encode(text, add_special_tokens=False)
        spans = self.assistant_spans(messages, text)
        mask = [int(any(s <= start < e for s, e in spans)) for start, _ in encoding.offsets]
        return ChatEncoding(ids=list(encoding.ids), assistant_mask=mask)

    def _end_of_turn(self) -> int:
        """The token the template ends an assistant turn with (`<|im_end|>` for ChatML, `</s>` for Zephyr's): the
        first token after the reply in a probe conversation; eos without a template."""
        if self.template_source is None:
            return self.eos_id
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        try:
            before = self.render(probe[:1], add_generation_prompt=True)
            through = self.render(probe)
        except Exception:  # a template that needs a system message or other fields: fall back to eos
            return self.eos_id
        tail = through[len(before) :].removeprefix("ok") if through.startswith(before) else ""
        ids = self.encode(tail.strip()) if tail.strip() else []
        return ids[0] if ids else self.eos_id


def open_tokenizer(path: str | Path):
    """The tokenizer of a model folder (or of the folder a file is in): ours (`tokenizer.model` with the chat
    markers minillm trains it with), else the folder's Hugging Face `tokenizer.json` with its own chat template
    (minillm.hf_tokenizer; a TinyLlama folder has both, and its sentencepiece model is not ours)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name == MODEL_FILE or (folder / MODEL_FILE).is_file():
        try:
            return Tokenizer(path if path.is_file() else folder)
        except ValueError:
            if not (folder / JSON_FILE).is_file():
                raise
    if (folder / JSON_FILE).is_file():
        return HFTokenizer(folder)
    raise FileNotFoundError(
        f"no tokenizer at {folder}: expected {MODEL_FILE} (minillm's) or tokenizer.json (a Hugging Face model's)"
    )
