import pytest

from minillm.data.datamodule import corpus_tokenizer
from minillm.tokenizer import Tokenizer, TokenizerConfig, apply_chat_template
from tests.conftest import FIXTURES

ROUND_TRIP = [
    "To be, or not to be, that is the question.",
    "你好，MiniGPT！今天天气很好。「引号」",  # Chinese with full-width punctuation
    "emoji 😀🎉 and 👩‍💻 mixed",
    "line one\nline two\n\n\nafter blank lines\r\n",
    "   leading spaces, runs of     spaces, trailing   ",
    "\ttabs\tand 1234567890 digits",
    "unseen characters: Ωμέγα ж ☃ 𝔘",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_any_text_round_trips_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_ids_are_fixed(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (4, 5)
    assert tokenizer.vocab_size == 512


def test_chat_markers_typed_by_a_user_are_ordinary_text(tokenizer):
    text = "please print <|im_end|> and <|im_start|>assistant literally"
    ids = tokenizer.encode(text)
    assert tokenizer.im_end_id not in ids and tokenizer.im_start_id not in ids
    assert tokenizer.decode(ids) == text
    enc = apply_chat_template(tokenizer, [{"role": "user", "content": text}])
    assert enc.ids.count(tokenizer.im_end_id) == 1  # only the one the template closes the turn with


def test_chat_template_mask_covers_exactly_the_assistant_tokens(tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I am fine."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
    ]
    enc = apply_chat_template(tokenizer, messages)
    assert len(enc.ids) == len(enc.assistant_mask)
    learned = [t for t, m in zip(enc.ids, enc.assistant_mask) if m]
    expected = []
    for m in messages:
        if m["role"] == "assistant":
            expected += tokenizer.encode(m["content"]) + [tokenizer.im_end_id]
    assert learned == expected
    # The rendered text is ChatML.
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    pieces = [tokenizer.id_to_piece(t) if t in (4, 5) else tokenizer.decode([t]) for t in enc.ids]
    assert "".join(pieces).replace("▁", " ") == rendered


def test_generation_prompt_opens_an_assistant_turn(tokenizer):
    enc = apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    tail = [tokenizer.im_start_id] + tokenizer.encode("assistant\n")
    assert enc.ids[-len(tail) :] == tail
    assert not any(enc.assistant_mask)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([{"role": "user", "content": 3}], "content must be a string"),
    ],
)
def test_chat_template_rejects_bad_messages(tokenizer, messages, message):
    with pytest.raises(ValueError, match=message):
        apply_chat_template(tokenizer, messages)


def test_trained_tokenizers_are_cached_by_corpus_and_settings(tmp_path):
    corpus = tmp_path / "a.txt"
    corpus.write_text((FIXTURES / "corpus.txt").read_text(encoding="utf-8") * 20, encoding="utf-8")
    config = TokenizerConfig(vocab_size=400, character_coverage=1.0, cache_dir=str(tmp_path / "cache"))
    first = corpus_tokenizer([corpus], config)
    first_bytes = first.path.read_bytes()  # the first training's file, before the retrain overwrites it
    stamp = first.path.stat().st_mtime_ns
    again = corpus_tokenizer([corpus], config)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # reused, not retrained
    retrained = corpus_tokenizer([corpus], TokenizerConfig(**{**config.__dict__, "retrain": True}))
    assert retrained.path == first.path and retrained.path.stat().st_mtime_ns != stamp
    other_vocab = corpus_tokenizer([corpus], TokenizerConfig(**{**config.__dict__, "vocab_size": 410}))
    assert other_vocab.path != first.path and other_vocab.vocab_size == 410
    corpus.write_text((FIXTURES / "corpus.txt").read_text(encoding="utf-8") * 21, encoding="utf-8")
    assert corpus_tokenizer([corpus], config).path != first.path
    assert retrained.path.read_bytes() == first_bytes  # retraining on the same corpus keeps every id


def test_too_small_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.vocab_size must be >= 300"):
        TokenizerConfig(vocab_size=100)
    corpus = tmp_path / "zh.txt"
    corpus.write_text("".join(chr(0x4E00 + i) for i in range(400)) + "\n", encoding="utf-8")
    config = TokenizerConfig(vocab_size=300, character_coverage=1.0, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="Adjust tokenizer.vocab_size"):
        corpus_tokenizer([corpus], config)


def test_missing_tokenizer_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        Tokenizer(tmp_path / "nothing")


def test_the_jinja_chat_template_and_the_python_one_render_the_same_text(tokenizer):
    """Exports carry CHAT_TEMPLATE (Jinja, for transformers); training encodes chat_turns: one layout."""
    import jinja2

    from minillm.tokenizer import CHAT_TEMPLATE, IM_END, IM_START, chat_turns

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好, what is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 3 + 4?\nThanks."},
    ]
    for generation_prompt in (False, True):
        rendered = jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=generation_prompt)
        turns = chat_turns(messages, generation_prompt)
        assert rendered == "".join(h + c + e for h, c, e in turns)
        assert rendered.count(IM_START) == len(messages) + generation_prompt and rendered.count(IM_END) == 4
        ids = apply_chat_template(tokenizer, messages, generation_prompt).ids  # the same turns, markers by id
        assert ids.count(tokenizer.im_start_id) == len(turns) and ids.count(tokenizer.im_end_id) == len(messages)
        assert tokenizer.decode([i for i in ids if i not in (tokenizer.im_start_id, tokenizer.im_end_id)]) == "".join(
            h.removeprefix(IM_START) + c + e.removeprefix(IM_END) for h, c, e in turns
        )
