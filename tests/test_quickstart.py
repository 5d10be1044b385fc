import subprocess
import sys

import pytest

from minillm.generate import load_model


@pytest.mark.slow
def test_quickstart_builds_data_and_tokenizer_and_generates(tmp_path):
    """What `make demo` runs, from an empty working directory (downloads the real corpus packages)."""
    result = subprocess.run(
        [sys.executable, "-m", "minillm.quickstart", "seed=3"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "6,524,160 parameters" in out
    for mode in ("[greedy]", "[beam search, 3 beams]", "[stream]", "[TextGenerator.sample_generate]"):
        assert mode in out
    assert (tmp_path / "data/builtin/manifest.json").is_file()
    tokenizers = list((tmp_path / "data/tokenizers").glob("bpe8192-*/tokenizer.model"))
    assert len(tokenizers) == 1
    model, tokenizer = load_model(str(tmp_path / "outputs/quickstart/init"))
    assert tokenizer.vocab_size == model.config.vocab_size == 8192
    assert tokenizer.decode(tokenizer.encode("你好，MiniGPT！")) == "你好，MiniGPT！"
    # A second run reuses the data and the tokenizer.
    again = subprocess.run(
        [sys.executable, "-m", "minillm.quickstart", "seed=3"], cwd=tmp_path, capture_output=True, text=True
    )
    assert again.returncode == 0 and "reusing" in again.stderr and "is current" in again.stderr

    def generations(stdout):  # the generated lines (same seed, same weights), without timings
        return [line for line in stdout.splitlines() if line.startswith("  ")]

    assert len(generations(out)) == 9 and generations(again.stdout) == generations(out)
