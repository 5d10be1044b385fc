"""The chain `make demo` runs (pretrain, generate, SFT, DPO, reward, RLHF, chat, the gold reward model, the report) on
the real built-in corpus, from an empty working directory (slow)."""

import json
import os
import subprocess
import sys

import pytest

SHORT = [
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "resume=auto",
]


@pytest.mark.slow
def test_the_demo_chain_on_the_builtin_corpus(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MINIGPT_DATA_DIR"}

    def run(module, *args, stdin=None):
        done = subprocess.run(
            [sys.executable, "-m", module, *args], cwd=tmp_path, env=env, input=stdin, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    run("minillm.train", "stage=pretrain", "model=tiny", "experiment=demo", *SHORT)
    final = tmp_path / "outputs" / "pretrain_tiny" / "final"
    assert (final / "model.safetensors").is_file() and (tmp_path / "data" / "builtin" / "manifest.json").is_file()
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    again = run("minillm.train", "stage=pretrain", "model=tiny", "experiment=demo", *SHORT)  # nothing to redo
    assert "is finished (step 3" in again and (final / "model.safetensors").stat().st_mtime_ns == stamp
    out = run(
        "minillm.generate",
        f"model_path={final}",
        'prompt=["To be, or not to be", "你好，MiniGPT！"]',
        "max_new_tokens=8",
        "seed=0",
    )
    assert "To be, or not to be" in out and "你好，MiniGPT！" in out

    for stage, parent in (("sft", "pretrain"), ("dpo", "sft"), ("reward", "sft"), ("rlhf", "dpo")):
        out = run("minillm.train", f"stage={stage}", "model=tiny", f"experiment=demo_{stage}", *SHORT)
        assert f"initialised from outputs/{parent}_tiny/final" in out
        if stage == "sft":  # the SFT model's own wrong answers, for DPO and the reward model
            out = run("minillm.pairs", "model_path=outputs/sft_tiny/final", "limit=16", "max_new_tokens=8")
            assert "verifiable training questions" in out
    assert (tmp_path / "outputs" / "rlhf_tiny" / "final" / "model.safetensors").is_file()
    # the gold reward model: the reward model's recipe on the other half of the pairs, in its own run dir
    out = run("minillm.train", "stage=reward", "model=tiny", "experiment=demo_reward_gold", *SHORT)
    assert "initialised from outputs/sft_tiny/final" in out
    stats = [tmp_path / "outputs" / run_dir / "dataset_stats.json" for run_dir in ("reward_tiny", "reward-gold_tiny")]
    halves = [json.loads(path.read_text())["sources"]["verifiable_pairs"]["train_records"] for path in stats]
    assert all(300 < n < 1200 for n in halves)  # about half of 1,500 pairs each
    card = run("minillm.report", "model_name=tiny", "eval.limit=4", "eval.max_new_tokens=4", "eval.batch_size=4")
    assert "| reward-gold |" in card and "gold score" in card and "bpb ratio" in card
    out = run(
        "minillm.chat",
        "model_path=outputs/rlhf_tiny/final",
        "do_sample=false",
        "max_new_tokens=8",
        stdin="What is 12 + 7?\n/exit\n",
    )
    assert out.count("bot> ") == 1
