"""Shared fixtures: a tokenizer trained once per session on a small fixture corpus, and micro models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from minillm.model import MiniGPT, ModelConfig  # noqa: E402
from minillm.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    lines = (FIXTURES / "corpus.txt").read_text(encoding="utf-8").splitlines()
    config = TokenizerConfig(vocab_size=512, character_coverage=1.0)
    return train_tokenizer([line for line in lines if line.strip()] * 20, tmp_path_factory.mktemp("tok"), config)


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """Tests run in a temporary working directory: they never write the repo's data/ or outputs/."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")  # read at import
    monkeypatch.chdir(tmp_path)


def micro_config(vocab_size: int, **overrides) -> ModelConfig:
    shape = dict(vocab_size=vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=64)
    return ModelConfig(**(shape | overrides))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small data dir in the standard layout: pretrain/ with a .jsonl and a .txt source."""
    root = tmp_path_factory.mktemp("data")
    lines = [line for line in (FIXTURES / "corpus.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    (root / "pretrain").mkdir()
    with (root / "pretrain" / "verses.jsonl").open("w", encoding="utf-8") as f:
        for i in range(300):
            text = " ".join(lines[(i + k) % len(lines)] for k in range(1 + i % 4))
            f.write(json.dumps({"text": f"{i}: {text}"}, ensure_ascii=False) + "\n")
    paragraphs = [f"Paragraph {i}.\n" + lines[i % len(lines)] for i in range(120)]
    (root / "pretrain" / "prose.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    return root


def micro_overrides(root: Path, data: Path, *extra: str, stage: str = "pretrain") -> list[str]:
    """A micro model on the fixture data, every cache and output under `root`."""
    return [
        f"stage={stage}",
        "model=tiny",
        "model.n_layer=2",
        "model.n_embd=64",
        "model.n_head=4",
        "model.n_kv_head=2",
        "model.block_size=32",
        "tokenizer.vocab_size=512",
        "tokenizer.character_coverage=1.0",
        f"tokenizer.cache_dir={root}/tokenizers",
        f"data.dir={data}",
        f"data.cache_dir={root}/datasets",
        "data.batch_size=4",
        "data.val_ratio=0.1",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "callbacks.checkpoint.every_n_train_steps=2",
        "optim.warmup_steps=2",
        f"run_dir={root}/run",
        *extra,
    ]


def pair_overrides(root: Path, data: Path, init: Path, *extra: str, stage: str) -> list[str]:
    """A micro preference stage (dpo, reward) from `init`, with prompt + completion lengths that fit the block."""
    lengths = ("stage.max_prompt_length=20", "stage.max_completion_length=12")
    return micro_overrides(root, data, f"init_from={init}", *lengths, *extra, stage=stage)


CHATS = [
    [("user", "What is 2 + 3?"), ("assistant", "5")],
    [("system", "You are terse."), ("user", "Hello"), ("assistant", "Hi."), ("user", "你好"), ("assistant", "你好！")],
    [("user", "Recite the first line."), ("assistant", "In the beginning God created the heaven and the earth.")],
    [("user", "Reverse the words: apple moon"), ("assistant", "moon apple")],
]


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory) -> Path:
    """A data dir with sft/ in two formats (minimind conversations and OpenAI messages)."""
    root = tmp_path_factory.mktemp("chat")
    (root / "sft").mkdir()
    with (root / "sft" / "dialogues.jsonl").open("w", encoding="utf-8") as f:
        for i in range(240):
            turns = [{"role": r, "content": c} for r, c in CHATS[i % len(CHATS)]]
            turns[-1]["content"] += f" ({i % 7})"
            f.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    with (root / "sft" / "qa.jsonl").open("w", encoding="utf-8") as f:
        for i in range(120):
            msgs = [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return root


@pytest.fixture(scope="session")
def pref_dir(tmp_path_factory) -> Path:
    """A data dir with preference/ in the TRL and the minimind formats."""
    root = tmp_path_factory.mktemp("pref")
    (root / "preference").mkdir()
    with (root / "preference" / "sums.jsonl").open("w", encoding="utf-8") as f:
        for i in range(160):
            f.write(json.dumps({"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 7)}) + "\n")
    with (root / "preference" / "greetings.jsonl").open("w", encoding="utf-8") as f:
        for i in range(80):
            prompt = [{"role": "user", "content": f"Hello number {i}"}]
            f.write(
                json.dumps(
                    {
                        "chosen": prompt + [{"role": "assistant", "content": "Hi, friend."}],
                        "rejected": prompt + [{"role": "assistant", "content": f"Go away {i}."}],
                    }
                )
                + "\n"
            )
    return root


@pytest.fixture(scope="session")
def prompt_dir(tmp_path_factory):
    """prompts/ with a TRL prompt file (answers for the verifiable reward) and a chat file (answer = reply)."""
    root = tmp_path_factory.mktemp("prompts")
    (root / "prompts").mkdir()
    with (root / "prompts" / "sums.jsonl").open("w") as f:
        for i in range(100):
            f.write(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n")
    with (root / "prompts" / "chats.jsonl").open("w") as f:
        for i in range(40):
            msgs = [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]
            f.write(json.dumps({"conversations": msgs}) + "\n")
    return root


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, data_dir) -> Path:
    """The final/ folder of a micro pretraining run (what SFT starts from)."""
    from minillm.train import build

    root = tmp_path_factory.mktemp("pretrained")
    assert build(micro_overrides(root, data_dir, "trainer.max_steps=4")).fit() == 0
    return root / "run" / "final"


@pytest.fixture(autouse=True)
def _checkpoints_load_safely(tmp_path):
    """Every checkpoint a test writes must load with weights_only=True (no pickled objects)."""
    yield
    for ckpt in tmp_path.rglob("*.ckpt"):
        if ckpt.stat().st_size > 10_000:  # skip the deliberately broken ones
            try:
                torch.load(ckpt, map_location="cpu", weights_only=True)
            except Exception as e:
                if "evil" not in ckpt.name and "truncated" not in ckpt.name:
                    raise AssertionError(f"{ckpt} does not load with weights_only=True: {e}") from e


@pytest.fixture
def micro_model(tokenizer) -> MiniGPT:
    torch.manual_seed(0)
    return MiniGPT(micro_config(tokenizer.vocab_size)).eval()


@pytest.fixture
def eval_data(tmp_path):
    """A data dir for `minillm eval`: pretraining text, 5 held-out sums (task "add") and 4 preference pairs."""
    root = tmp_path / "data"
    (root / "eval").mkdir(parents=True)
    (root / "pretrain").mkdir()
    with (root / "pretrain" / "t.jsonl").open("w") as f:
        for i in range(400):
            f.write(json.dumps({"text": f"Line {i}: to be or not to be."}) + "\n")
    with (root / "eval" / "verifiable.jsonl").open("w") as f:
        for i in range(5):
            msgs = [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]
            f.write(json.dumps({"conversations": msgs, "answer": str(i + 1), "task": "add"}) + "\n")
    with (root / "eval" / "sums.jsonl").open("w") as f:
        for i in range(4):
            f.write(json.dumps({"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": "no"}) + "\n")
    return root
