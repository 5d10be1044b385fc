"""Long commands show progress on a terminal and stay quiet when stderr is not one (CI logs, pipes)."""

import io
import sys

from minillm.data.pairs import onpolicy_pairs
from minillm.evaluation import bits_per_byte
from minillm.progress import batch_starts, phase, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def on_screen(monkeypatch) -> Terminal:
    """stderr as a terminal, for the rest of the test (set in the test body: pytest resets sys.stderr after setup)."""
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    return screen


def test_a_bar_on_a_terminal_and_the_plain_iterable_elsewhere(monkeypatch):
    terminal = on_screen(monkeypatch)
    assert list(batch_starts(10, 4, "work")) == [0, 4, 8]
    phase("step two")
    shown = terminal.getvalue()
    assert "work" in shown and "0/3" in shown and "step two\n" in shown
    quiet = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", quiet)
    items = [1, 2]
    assert progress(items, "work") is items and list(batch_starts(10, 4, "work")) == [0, 4, 8]
    phase("step two")
    assert quiet.getvalue() == ""


def conversations(n):
    return [
        {
            "conversations": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": "x"}],
            "answer": str(i + 1),
        }
        for i in range(n)
    ]


def test_pairs_and_eval_count_their_batches_on_a_terminal(micro_model, tokenizer, monkeypatch):
    terminal = on_screen(monkeypatch)
    result = onpolicy_pairs(micro_model, tokenizer, conversations(5), max_new_tokens=2, batch_size=2)
    bits_per_byte(micro_model, tokenizer, ["In the beginning", "And God said"])
    shown = terminal.getvalue()
    assert result["asked"] == 5 and "on-policy pairs:   0%" in shown and "/3 [" in shown
    assert "bits per byte:   0%" in shown and "/2 [" in shown


def test_the_same_work_prints_nothing_when_not_a_terminal(micro_model, tokenizer, monkeypatch):
    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    onpolicy_pairs(micro_model, tokenizer, conversations(5), max_new_tokens=2, batch_size=2)
    bits_per_byte(micro_model, tokenizer, ["In the beginning"])
    assert quiet.getvalue() == ""
