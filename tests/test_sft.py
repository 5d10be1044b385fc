import io
import json

import lightning as L
import pytest
import torch

from minillm import chat
from minillm import generate as generate_api
from minillm.data.kinds import SFT, encode_chat
from minillm.data.records import DataError, to_messages
from minillm.generate import load_model
from minillm.losses import IGNORE_INDEX
from minillm.model import document_index
from minillm.train import build
from tests.conftest import micro_overrides


def sft(root, chat_dir, pretrained, *extra):
    return micro_overrides(root, chat_dir, f"init_from={pretrained}", "data.val_ratio=0.1", *extra, stage="sft")


FORMATS = {
    "conversations": {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    "messages": {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    },
    "alpaca": {"instruction": "Greet", "input": "Bob", "output": "Hello, Bob!"},
    "prompt_response": {"prompt": "Hi", "response": "Hello!"},
    "prompt_completion": {"prompt": "Hi", "completion": "Hello!"},
    "prompt_completion_chat": {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Hello!"}],
    },
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
        ]
    },
    "tool": {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": '{"temp": -3}'},
            {"from": "gpt", "value": "It is -3 degrees."},
        ]
    },
    "multi_turn": {
        "conversations": [
            {"role": "user", "content": "A"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "B"},
            {"role": "assistant", "content": "two"},
        ]
    },
}


@pytest.mark.parametrize("name", FORMATS)
def test_labels_cover_exactly_the_assistant_tokens_in_every_format(tokenizer, name):
    messages = to_messages(FORMATS[name])
    ids, labels, truncated = encode_chat(tokenizer, messages, window=200)
    assert not truncated and len(ids) == len(labels)
    learned = [t for t in labels if t != IGNORE_INDEX]
    expected = []
    for m in messages:
        if m["role"] == "assistant":
            expected += tokenizer.encode(m["content"]) + [tokenizer.im_end_id]
    assert learned == expected
    if name == "alpaca":
        assert messages[0]["content"] == "Greet\n\nBob"
    same = ("messages", "prompt_completion_chat", "sharegpt")  # one conversation in three formats
    if name in same:
        assert messages == to_messages(FORMATS["messages"])
    if name == "prompt_completion":
        assert messages == to_messages(FORMATS["prompt_response"])
    if name == "tool":  # the tool's output is in the context, rendered as its own turn, and never learned
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
        assert 'tool\n{"temp": -3}\nassistant\nIt is' in tokenizer.decode(ids)  # control tokens decode to nothing


@pytest.mark.parametrize(
    "record, message",
    [
        ({"conversations": []}, "the conversation is empty"),
        ({"conversations": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
        ({"body": "plain"}, "no chat fields"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown speaker 'alien'"),
        ({"prompt": "Hi", "completion": 3}, "prompt and completion must each be a string or a list of messages"),
    ],
)
def test_bad_conversations_are_named_with_file_and_line(tmp_path, tokenizer, record, message):
    from minillm.config import DataConfig
    from minillm.data.datamodule import MiniLLMDataModule

    f = tmp_path / "sft" / "bad.jsonl"
    f.parent.mkdir()
    good = {"prompt": "Hi", "response": "Hello"}
    f.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    dm = MiniLLMDataModule(DataConfig(cache_dir=str(tmp_path / "c"), batch_size=1), [f], tokenizer, 32, 0, kind=SFT)
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: .*{message}"):
        dm.setup()


def test_truncation_drops_the_oldest_whole_turns_and_keeps_the_system_prompt(tokenizer):
    messages = [{"role": "system", "content": "Sys."}]
    for i in range(6):
        messages += [
            {"role": "user", "content": f"Question number {i}?"},
            {"role": "assistant", "content": f"Answer number {i}."},
        ]
    full, _, _ = encode_chat(tokenizer, messages, window=10_000)
    ids, labels, truncated = encode_chat(tokenizer, messages, window=len(full) - 5)
    text = tokenizer.decode(ids)
    assert truncated and text.startswith("system\nSys.")  # control tokens decode to nothing
    assert "Question number 0?" not in text and "Answer number 5." in text
    assert "Question number 1?" in text  # only whole exchanges were dropped
    # A last answer that cannot fit is cut, never dropped: some of it is still learned.
    long = [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": "word " * 200}]
    ids, labels, truncated = encode_chat(tokenizer, long, window=40)
    assert truncated and len(ids) == 40 and sum(t != IGNORE_INDEX for t in labels) > 15
    # A prompt longer than the window keeps the end, where the answer is.
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    ids, labels, _ = encode_chat(tokenizer, long_prompt, window=40)
    assert [t for t in labels if t != IGNORE_INDEX] == tokenizer.encode("ok") + [tokenizer.im_end_id]


def test_packed_conversations_never_attend_across_boundaries(tmp_path, chat_dir, pretrained):
    run = build(sft(tmp_path, chat_dir, pretrained, "data.packing=true", "model.block_size=160"), inspect=True)
    row = run.datamodule.train[0]
    positions = row["position_ids"]
    starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
    assert len(starts) > 2  # several conversations share the window
    model = run.module.model.eval()
    with torch.no_grad():
        packed = model(
            row["input_ids"][None], position_ids=positions[None], document_ids=document_index(positions[None])
        ).logits[0]
        for a, b in zip(starts, starts[1:]):
            alone = model(row["input_ids"][None, a:b]).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-5, rtol=0)
    assert 0.5 < run.datamodule.stats["packing_efficiency"] <= 1.0


def test_plain_text_records_are_learned_on_every_token_beside_conversations(tmp_path, chat_dir, pretrained):
    """A {"text"} record in an SFT file is pretraining text: its tokens and EOS are all targets (no chat template),
    packed beside the conversations, whose targets stay the assistant tokens; PPO-ptx reads it the same way."""
    from minillm.data.kinds import encode_sft

    data = tmp_path / "d"
    (data / "sft").mkdir(parents=True)
    for f in (chat_dir / "sft").iterdir():
        (data / "sft" / f.name).symlink_to(f)
    prose = [f"The river runs past the old mill number {i} and on to the sea." for i in range(60)]
    (data / "sft" / "prose.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in prose))
    run = build(sft(tmp_path, data, pretrained, "data.packing=true", "model.block_size=64"), inspect=True)
    tokenizer = run.datamodule.tokenizer
    ids, labels, cut = encode_sft(tokenizer, {"text": prose[0]}, 64)
    assert ids == tokenizer.encode(prose[0]) + [tokenizer.eos_id] and labels == ids and not cut
    assert tokenizer.im_start_id not in ids
    chat_ids, chat_labels, _ = encode_sft(
        tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], 64
    )
    assert chat_ids[0] == tokenizer.im_start_id and chat_labels.count(IGNORE_INDEX) > 0
    stats = run.datamodule.stats["sources"]
    assert stats["prose"]["train_records"] > 40 and stats["prose"]["bad_records"] == 0
    starts = {tuple(tokenizer.encode(p)[:4]) for p in prose}
    seen = {"text": 0, "chat": 0}
    for row in run.datamodule.train:
        positions = row["position_ids"].tolist()
        bounds = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for a, b in zip(bounds, bounds[1:]):
            doc, target = row["input_ids"][a:b].tolist(), row["labels"][a:b].tolist()
            if tuple(doc[:4]) in starts:
                assert target == doc and doc[-1] == tokenizer.eos_id  # every token learned, EOS last
                seen["text"] += 1
            else:
                assert doc[0] == tokenizer.im_start_id and IGNORE_INDEX in target  # a conversation, as before
                seen["chat"] += 1
    assert seen["text"] > 20 and seen["chat"] > 100


def test_sft_starts_from_the_pretrained_weights(tmp_path, chat_dir, pretrained):
    run = build(sft(tmp_path, chat_dir, pretrained))
    init, tokenizer = load_model(str(pretrained))
    for name, tensor in init.state_dict().items():
        assert torch.equal(run.module.model.state_dict()[name], tensor), name
    assert run.datamodule.tokenizer.sha256 == tokenizer.sha256  # no tokenizer is trained for SFT
    assert run.config.init_sha256 and run.config.init_from == str(pretrained)


def test_sft_lowers_the_held_out_assistant_loss(tmp_path, chat_dir, pretrained):
    run = build(
        sft(
            tmp_path,
            chat_dir,
            pretrained,
            "trainer.max_steps=30",
            "trainer.val_check_interval=30",
            "optim.lr=3e-3",
            "trainer.limit_val_batches=null",
        )
    )
    before = L.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, inference_mode=False
    ).validate(run.module, datamodule=run.datamodule, verbose=False)[0]["val/loss"]
    assert run.fit() == 0
    after = float(run.trainer.callback_metrics["val/loss"])
    assert after < before - 0.5
    stats = json.loads((tmp_path / "run" / "dataset_stats.json").read_text())
    assert stats["kind"] == "sft" and stats["sources"]["qa"]["train_assistant_tokens"] > 0
    model, tokenizer = load_model(str(tmp_path / "run" / "final"))
    snapshot = json.loads((tmp_path / "run" / "training_config_snapshot.json").read_text())
    assert snapshot["config"]["init_sha256"] == run.config.init_sha256


class GradCapture(L.Callback):
    """The gradients of the first optimizer step, as the optimizer sees them (after every micro-batch)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def test_gradient_accumulation_does_not_change_the_gradient(tmp_path, chat_dir, pretrained):
    """The step's gradient, not the parameters after it: Adam's first step is ~lr * sign(g), blind to a scale."""
    grads = {}
    for name, extra in {
        "a1b4": ["data.batch_size=4"],
        "a2b2": ["data.batch_size=2", "trainer.accumulate_grad_batches=2"],
    }.items():
        run = build(
            sft(
                tmp_path / name,
                chat_dir,
                pretrained,
                "trainer.max_steps=1",
                "trainer.gradient_clip_val=0",
                "trainer.limit_val_batches=0",
                "data.val_ratio=0",
                *extra,
            )
        )
        capture = GradCapture()
        run.trainer.callbacks.append(capture)
        assert run.fit() == 0
        grads[name] = capture.grads
    assert grads["a1b4"].keys() == grads["a2b2"].keys() and len(grads["a1b4"]) > 0
    for k, g in grads["a1b4"].items():
        assert g.abs().sum() > 0, k
        torch.testing.assert_close(grads["a2b2"][k], g, atol=1e-6, rtol=1e-4, msg=k)


def test_init_from_auto_without_the_parent_run_says_what_to_run(tmp_path, chat_dir):
    overrides = [o for o in micro_overrides(tmp_path, chat_dir, stage="sft")]
    with pytest.raises(FileNotFoundError, match="python -m minillm.train stage=pretrain model=tiny"):
        build(overrides)


def test_resume_after_the_parent_weights_changed_is_refused(tmp_path, chat_dir, pretrained):
    copy = tmp_path / "parent"
    import shutil

    shutil.copytree(pretrained, copy)
    assert build(sft(tmp_path, chat_dir, copy, "trainer.max_steps=2")).fit() == 0
    model, tok = load_model(str(copy))
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    from minillm.pretrained import save_pretrained

    save_pretrained(model, tok, copy)
    with pytest.raises(ValueError, match="parent stage was retrained"):
        build(sft(tmp_path, chat_dir, copy, "trainer.max_steps=2", "resume=auto"))


def test_architecture_mismatch_with_the_init_weights_is_an_error(tmp_path, chat_dir, pretrained):
    with pytest.raises(ValueError, match="different architecture.*n_layer: 2 \\(init\\) vs 3"):
        build(sft(tmp_path, chat_dir, pretrained, "model.n_layer=3"))


def test_chat_cli_keeps_history_and_resets(pretrained, monkeypatch):
    seen = []  # the conversation the model is given at each turn

    def spy(model, tokenizer, messages, config):
        seen.append([dict(m) for m in messages])
        yield from chat_stream(model, tokenizer, messages, config)

    chat_stream = generate_api.stream
    monkeypatch.setattr(generate_api, "stream", spy)  # chat.run takes it from minillm.generate
    stdin = io.StringIO("Hello\nWhat did I say?\n/reset\nAgain\n/exit\n")
    out = io.StringIO()
    chat.main([f"model_path={pretrained}", "max_new_tokens=4", "seed=0", 'system="Be brief."'], stdin=stdin, out=out)
    text = out.getvalue()
    assert text.count("bot> ") == 3 and "(history cleared)" in text and "you> Hello" in text
    first_reply = text.split("bot> ")[1].split("\n")[0]
    system = {"role": "system", "content": "Be brief."}
    assert seen[0] == [system, {"role": "user", "content": "Hello"}]
    assert seen[1] == [  # the second turn carries the first exchange, the reply as it was streamed
        system,
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "What did I say?"},
    ]
    assert seen[2] == [system, {"role": "user", "content": "Again"}]  # /reset keeps only the system message


def test_chat_survives_bytes_that_are_not_utf8_and_a_failing_turn(pretrained, monkeypatch):
    from minillm import chat

    seen, calls = [], []
    chat_stream = generate_api.stream

    def flaky(model, tokenizer, messages, config):
        calls.append(1)
        if len(calls) == 2:  # the second turn fails half way
            yield "half"
            raise RuntimeError("the decoder broke")
        seen.append([dict(m) for m in messages])
        yield from chat_stream(model, tokenizer, messages, config)

    monkeypatch.setattr(generate_api, "stream", flaky)
    raw = "caf\xe9 \xff\n".encode("latin-1")  # 0xE9 and 0xFF typed in a latin-1 terminal: not UTF-8
    stdin = io.TextIOWrapper(io.BytesIO(raw + b"Hello\nStill there?\n/exit\n"), encoding="utf-8")
    out = io.StringIO()
    chat.main([f"model_path={pretrained}", "max_new_tokens=3", "seed=0"], stdin=stdin, out=out)
    text = out.getvalue()
    assert seen[0] == [{"role": "user", "content": "caf\ufffd \ufffd"}]  # replaced, not a crash
    assert "error: RuntimeError: the decoder broke (the conversation so far is kept)" in text
    first = text.split("bot> ")[1].split("\n")[0]
    assert seen[1] == [  # the failed turn left no trace; the first exchange is kept
        {"role": "user", "content": "caf\ufffd \ufffd"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Still there?"},
    ]


def test_debug_shows_the_assistant_loss_mask_for_sft(tmp_path, chat_dir, pretrained, capsys):
    from minillm import debug

    debug.main(sft(tmp_path, chat_dir, pretrained))
    out = capsys.readouterr().out
    mask = json.loads(out.split("-- loss mask (1 = trained on): ")[1].split("\n")[0])
    assert 0 in mask and 1 in mask  # prompts are not trained on, answers are
    assert "== one optimizer step: loss" in out


def test_generate_cli_reads_a_prompt_file_and_speaks_chat(tmp_path, pretrained, capsys):
    from minillm.generate import __main__ as generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 + 3?\n\nHello\n", encoding="utf-8")
    generate.main([f"model_path={pretrained}", f"prompt_file={prompts}", "chat=true", "max_new_tokens=3", "seed=1"])
    out = capsys.readouterr().out
    assert out.count("→ ") == 2 and "What is 2 + 3?" in out and "Hello" in out
    with pytest.raises(SystemExit, match="max_new_tokenz"):
        generate.main([f"model_path={pretrained}", "prompt=x", "max_new_tokenz=3"])
    many = tmp_path / "many.txt"  # decoded batch_size at a time: greedy text as one batch, in the file's order
    many.write_text("".join(f"line {i} of the file\n" for i in range(5)), encoding="utf-8")
    runs = []
    for size in (2, 16):
        generate.main([f"model_path={pretrained}", f"prompt_file={many}", f"batch_size={size}", "do_sample=false"])
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and [line for line in runs[0].splitlines() if line.startswith("line ")][0][:6] == "line 0"


def test_exact_match_counts_only_exact_replies(tokenizer):
    from minillm.evaluation import exact_match_rate
    from tests.test_generate import scripted

    records = [
        {
            "conversations": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": "7"}],
            "answer": "7",
        }
        for i in range(3)
    ]
    right = scripted(tokenizer, tokenizer.encode("7") + [tokenizer.im_end_id])
    assert exact_match_rate(right, tokenizer, records, batch_size=1)["exact_match"] == 1.0
    wrong = scripted(tokenizer, tokenizer.encode("77") + [tokenizer.im_end_id])
    result = exact_match_rate(wrong, tokenizer, records, batch_size=1)
    assert result["exact_match"] == 0.0 and result["examples"][0]["reply"] == "77"


@pytest.mark.slow
def test_sft_raises_held_out_exact_match_on_a_toy_family(tmp_path, pretrained):
    """The direction the report card asks of SFT (held-out exact match up from its start), on a family a micro
    model learns in seconds: name the first of two letters. Every letter is in training, no held-out pair is (in
    either order); the pretrained model answers none of them, the SFT model most."""
    from minillm.evaluation import exact_match_rate

    words = list("abcdefghijklmnopqrstuvwxyz")  # one token each, so the answer is one copied token

    def record(a: str, b: str) -> dict:
        turns = [{"role": "user", "content": f"First letter:\n{a} {b}"}, {"role": "assistant", "content": a}]
        return {"conversations": turns, "answer": a}

    pairs = [(i, j) for i in range(len(words)) for j in range(len(words)) if i != j]
    out = {(i, j) for i, j in pairs if (min(i, j) + 2 * max(i, j)) % 7 == 0}  # both orders held out
    data = tmp_path / "toy"
    (data / "sft").mkdir(parents=True)
    with (data / "sft" / "first.jsonl").open("w") as f:
        f.writelines(json.dumps(record(words[i], words[j])) + "\n" for i, j in pairs if (i, j) not in out)
    held_out = [record(words[i], words[j]) for i, j in sorted(out)]
    model, tokenizer = load_model(str(pretrained))
    before = exact_match_rate(model, tokenizer, held_out, max_new_tokens=12)["exact_match"]
    overrides = ["trainer.max_steps=400", "trainer.val_check_interval=400", "optim.lr=1e-3", "data.batch_size=8"]
    assert build(sft(tmp_path, data, pretrained, *overrides)).fit() == 0
    model, tokenizer = load_model(str(tmp_path / "run" / "final"))
    after = exact_match_rate(model, tokenizer, held_out, max_new_tokens=12)
    assert before == 0.0
    assert after["exact_match"] >= before + 0.5, after["examples"]  # measured: 0.98 of 92 held-out pairs


def test_the_architecture_comes_with_the_init_weights(tmp_path, chat_dir, pretrained):
    """init_from=<a folder of another shape> needs no model=: its shape, q/k/v biases, RoPE base and norm epsilon
    are the run's (recorded in its config); a key the command line sets itself still conflicts by name."""
    from minillm.model import MiniGPT
    from minillm.pretrained import save_pretrained
    from tests.conftest import micro_config

    _, tok = load_model(str(pretrained))
    torch.manual_seed(0)
    shape = dict(n_layer=3, n_embd=32, n_head=2, n_kv_head=1, attention_bias=True, rope_theta=1e6, norm_eps=1e-6)
    shape |= {"max_position_embeddings": 4096}  # what the weights are meant for, whatever block_size trains here
    init = MiniGPT(micro_config(tok.vocab_size, **shape)).eval()
    folder = save_pretrained(init, tok, tmp_path / "init")
    overrides = [o for o in sft(tmp_path, chat_dir, folder) if not o.startswith(("model.n_", "model.block"))]
    run = build(overrides, inspect=True)
    model = run.module.model.eval()
    assert {k: getattr(model.config, k) for k in shape} == shape
    assert {k: run.config.model[k] for k in shape} == shape  # the run config (snapshot, checkpoints) records them
    exported = save_pretrained(model, tok, tmp_path / "out")
    assert json.loads((exported / "config.json").read_text())["max_position_embeddings"] == 4096
    ids = torch.randint(0, tok.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, init(ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="different architecture.*n_layer: 3 \\(init\\) vs 2"):
        build([*overrides, "model.n_layer=2"], inspect=True)
