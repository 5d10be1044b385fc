"""Hugging Face tokenizer.json folders: ids, special tokens, their own chat template and the assistant mask it
gives, and a model folder with such a tokenizer trained with SFT and chatted with."""

import json

import pytest
import torch

from minillm.hf_tokenizer import HFTokenizer, TemplateError, open_tokenizer
from minillm.tokenizer import Tokenizer, apply_chat_template
from tests.conftest import FIXTURES

CHATML = (  # Qwen2.5 / SmolLM2-Instruct layout (without their default system prompt)
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ZEPHYR = (  # TinyLlama-Chat's: turns end with eos
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "It is 8."},
]


def hf_tokenizer_folder(folder, template: str | None, eos: str = "<|im_end|>", extra=()):
    """A byte-level BPE tokenizer.json trained here on the fixture corpus, as Hugging Face models ship it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "</s>", *extra]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    lines = (FIXTURES / "corpus.txt").read_text(encoding="utf-8").splitlines()
    backend.train_from_iterator(lines + ["What is 2 + 3? It is 8."] * 5, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {"eos_token": eos, "pad_token": "<|endoftext|>", "bos_token": None}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def marked(tok: HFTokenizer, encoding) -> str:
    """The text of the tokens the mask marks, special tokens spelled out."""
    return tok.backend.decode(
        [i for i, m in zip(encoding.ids, encoding.assistant_mask) if m], skip_special_tokens=False
    )


def test_a_chatml_tokenizer_json_masks_each_reply_and_its_end(tmp_path):
    tok = open_tokenizer(hf_tokenizer_folder(tmp_path / "chatml", CHATML))
    assert isinstance(tok, HFTokenizer) and tok.im_end_id == tok.backend.token_to_id("<|im_end|>")
    assert tok.eos_id == tok.im_end_id and tok.pad_id == tok.backend.token_to_id("<|endoftext|>")
    text = "Hello there, 你好 <|im_end|>"
    assert tok.encode(text)[-1] == tok.im_end_id and tok.decode(tok.encode(text)) == "Hello there, 你好 "
    enc = apply_chat_template(tok, CONVERSATION)
    rendered = tok.render(CONVERSATION)
    assert tok.backend.decode(enc.ids, skip_special_tokens=False) == rendered  # the template's text, token for token
    assert marked(tok, enc) == "5<|im_end|>It is 8.<|im_end|>"  # replies and their end, no headers or newlines
    prompt = apply_chat_template(tok, CONVERSATION[:2], add_generation_prompt=True)
    assert rendered.startswith(tok.backend.decode(prompt.ids, skip_special_tokens=False))
    assert not any(prompt.assistant_mask) and prompt.ids == enc.ids[: len(prompt.ids)]


def test_a_zephyr_template_ends_turns_with_eos(tmp_path):
    tok = open_tokenizer(hf_tokenizer_folder(tmp_path / "zephyr", ZEPHYR, eos="</s>", extra=["<|user|>"]))
    assert tok.im_end_id == tok.eos_id == tok.backend.token_to_id("</s>")
    enc = apply_chat_template(tok, CONVERSATION)
    assert marked(tok, enc) == "5</s>It is 8.</s>"


def test_a_template_that_does_not_render_in_order_is_refused_by_message(tmp_path):
    reordered = (
        "{% for message in messages | reverse %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
    )
    tok = open_tokenizer(hf_tokenizer_folder(tmp_path / "odd", reordered))
    with pytest.raises(TemplateError, match="renders message 2 \\(assistant\\)"):
        apply_chat_template(tok, CONVERSATION)
    without = open_tokenizer(hf_tokenizer_folder(tmp_path / "none", None))
    with pytest.raises(TemplateError, match="has no chat template"):
        apply_chat_template(without, CONVERSATION)


def test_open_tokenizer_prefers_ours_and_reads_a_foreign_sentencepiece_folder_by_its_json(tokenizer, tmp_path):
    ours = tmp_path / "ours"
    tokenizer.save(ours)
    assert isinstance(open_tokenizer(ours), Tokenizer)
    foreign = hf_tokenizer_folder(tmp_path / "tinyllama", ZEPHYR, eos="</s>")
    (foreign / "tokenizer.model").write_bytes(b"not ours")  # TinyLlama ships both files
    assert isinstance(open_tokenizer(foreign), HFTokenizer)
    with pytest.raises(FileNotFoundError, match="expected tokenizer.model .* or tokenizer.json"):
        open_tokenizer(tmp_path / "empty")


def test_a_model_with_a_tokenizer_json_trains_sft_exports_and_chats(tmp_path, chat_dir):
    """init_from a folder with a tokenizer.json: SFT learns on its template's reply tokens only, final/ keeps the
    tokenizer's own files, and chat renders its template."""
    import io

    from minillm import chat
    from minillm.model import MiniGPT
    from minillm.pretrained import load_pretrained, save_pretrained
    from minillm.train import build
    from tests.conftest import micro_config, micro_overrides

    tok = open_tokenizer(hf_tokenizer_folder(tmp_path / "tok", CHATML))
    torch.manual_seed(0)
    model = MiniGPT(micro_config(tok.vocab_size + 6, tie_embeddings=False))  # a padded embedding table, as Qwen2.5
    folder = save_pretrained(model, tok, tmp_path / "init")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "tokenizer.model").exists()
    overrides = micro_overrides(tmp_path, chat_dir, f"init_from={folder}", "trainer.max_steps=3", stage="sft")
    run = build([o for o in overrides if not o.startswith("model.")])
    batch = next(iter(run.datamodule.train_dataloader()))
    targets = batch["labels"][batch["labels"] >= 0].tolist()
    assert tok.im_end_id in targets and tok.im_start_id not in targets  # replies and their end, never headers
    assert run.fit() == 0
    final = tmp_path / "run" / "final"
    loaded, loaded_tok = load_pretrained(final)
    assert isinstance(loaded_tok, HFTokenizer) and loaded_tok.sha256 == tok.sha256
    assert loaded.config.vocab_size == tok.vocab_size + 6
    assert json.loads((final / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    out = io.StringIO()
    chat.run(
        chat.ChatCommand(model_path=str(final), max_new_tokens=4, do_sample=False),
        stdin=io.StringIO("Hi\n/exit\n"),
        out=out,
    )
    assert "bot> " in out.getvalue()
