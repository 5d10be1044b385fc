"""On-policy preference pairs (minillm pairs): the model's own wrong answers become rejected."""

import json

import torch

from minillm.data.pairs import onpolicy_pairs
from minillm.model import MiniGPT
from minillm.pairs import main
from minillm.pretrained import save_pretrained
from tests.conftest import micro_config
from tests.test_generate import scripted


def question(q: str, answer: str, **extra) -> dict:
    turns = [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
    return {"conversations": turns, "answer": answer, **extra}


def test_wrong_answers_become_pairs_and_right_or_empty_ones_do_not(tokenizer):
    records = [question("What is 2 + 3?", "5", task="add"), question("What is 3 + 3?", "6", task="add")]
    says_five = scripted(tokenizer, tokenizer.encode("5") + [tokenizer.im_end_id])
    result = onpolicy_pairs(says_five, tokenizer, records, max_new_tokens=4, batch_size=1)
    assert (result["asked"], result["wrong"], result["empty"]) == (2, 1, 0)
    assert result["pairs"] == [{"prompt": "What is 3 + 3?", "chosen": "6", "rejected": "5", "task": "add"}]
    silent = scripted(tokenizer, [tokenizer.im_end_id])
    result = onpolicy_pairs(silent, tokenizer, records, max_new_tokens=4)
    assert (result["wrong"], result["empty"], result["pairs"]) == (2, 2, [])


def test_the_command_writes_training_questions_only_and_keeps_a_newer_file(tmp_path, tokenizer, capsys, monkeypatch):
    (tmp_path / "sft").mkdir()
    (tmp_path / "eval").mkdir()
    train = [question(f"What is {i} + 1?", str(i + 1)) for i in range(6)]
    (tmp_path / "sft" / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "eval" / "sums.jsonl").write_text(json.dumps(question("What is 99 + 1?", "100")) + "\n")
    torch.manual_seed(0)
    folder = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "m")
    says_five = scripted(tokenizer, tokenizer.encode("5") + [tokenizer.im_end_id])
    monkeypatch.setattr("minillm.generate.load_model", lambda path, *_: (says_five, tokenizer))
    main([f"model_path={folder}", f"data_dir={tmp_path}", "family=sums", "max_new_tokens=3"])
    out = tmp_path / "preference" / "sums_onpolicy.jsonl"
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": "5"} for i in range(6) if i != 4]
    assert pairs == expected  # the held-out "What is 99 + 1?" is never asked
    assert "wrong answers written as pairs" in capsys.readouterr().out
    before = out.stat().st_mtime_ns
    main([f"model_path={folder}", f"data_dir={tmp_path}", "family=sums"])
    assert out.stat().st_mtime_ns == before and "kept" in capsys.readouterr().out
