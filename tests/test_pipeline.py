"""The chain `make demo` runs (pretrain, generate, SFT, chat) on the real built-in corpus, from an empty
working directory (slow)."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_pretrain_on_the_builtin_corpus_then_generate(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MINIGPT_DATA_DIR"}
    train = [
        sys.executable,
        "-m",
        "minillm.train",
        "stage=pretrain",
        "model=tiny",
        "experiment=demo",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "resume=auto",
    ]
    done = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = tmp_path / "outputs" / "pretrain_tiny" / "final"
    assert (final / "model.safetensors").is_file() and (tmp_path / "data" / "builtin" / "manifest.json").is_file()
    again = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True)  # nothing to redo
    assert again.returncode == 0 and "resume=auto: resuming from" in again.stdout
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "minillm.generate",
            f"model_path={final}",
            'prompt=["To be, or not to be", "你好，MiniGPT！"]',
            "max_new_tokens=8",
            "seed=0",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "To be, or not to be" in gen.stdout and "你好，MiniGPT！" in gen.stdout

    sft = [
        sys.executable,
        "-m",
        "minillm.train",
        "stage=sft",
        "model=tiny",
        "experiment=demo_sft",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "resume=auto",
    ]
    done = subprocess.run(sft, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "initialised from outputs/pretrain_tiny/final" in done.stdout
    chat = subprocess.run(
        [
            sys.executable,
            "-m",
            "minillm.chat",
            "model_path=outputs/sft_tiny/final",
            "do_sample=false",
            "max_new_tokens=8",
        ],
        input="What is 12 + 7?\n/exit\n",
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert chat.returncode == 0 and chat.stdout.count("bot> ") == 1, chat.stderr[-2000:]
