"""Shared fixtures: a tokenizer trained once per session on a small fixture corpus, and micro models."""

from __future__ import annotations

import os
from pathlib import Path

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
    monkeypatch.chdir(tmp_path)


def micro_config(vocab_size: int, **overrides) -> ModelConfig:
    shape = dict(vocab_size=vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=64)
    return ModelConfig(**(shape | overrides))


@pytest.fixture
def micro_model(tokenizer) -> MiniGPT:
    torch.manual_seed(0)
    return MiniGPT(micro_config(tokenizer.vocab_size)).eval()
