"""lm-evaluation-harness on our transformers export with our task YAMLs (minillm/lm_eval_tasks): its numbers
equal `minillm eval`'s on the same records (ref extra)."""

import json
from pathlib import Path

import pytest
import torch

from minillm import evaluation
from minillm.generate import load_model

pytestmark = pytest.mark.ref
TASKS = Path(__file__).parents[1] / "minillm" / "lm_eval_tasks"


def records(n: int) -> tuple[list[dict], list[dict]]:
    """(verifiable questions, verifiable pairs) in the built-in layout, made up here."""
    words = ["apple", "river", "stone", "lemon", "tiger", "paper", "cloud"]
    questions, pairs = [], []
    for i in range(n):
        a, b, c = words[i % 7], words[(i + 2) % 7], words[(i + 4) % 7]
        q = f"Reverse the words: {a} {b} {c}" if i % 2 else f"What is {i} + {i + 3}?"
        answer = f"{c} {b} {a}" if i % 2 else str(2 * i + 3)
        rejected = f"{b} {c} {a}" if i % 2 else str(2 * i + 4)
        convo = [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]
        questions.append({"conversations": convo, "answer": answer, "family": "verifiable"})
        pairs.append({"prompt": q, "chosen": answer, "rejected": rejected, "family": "verifiable"})
    return questions, pairs


def lm_eval_run(export: Path, task: str, limit: int) -> tuple[dict, list[dict]]:
    import lm_eval  # the ref venv has it: a missing one fails, never skips
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={export},dtype=float32",
        tasks=[task],
        task_manager=TaskManager(include_path=str(TASKS)),
        limit=limit,
        apply_chat_template=True,
        batch_size=4,
        device="cpu",
        log_samples=True,
    )
    return out["results"][task], out["samples"][task]


def test_lm_eval_pairs_and_exact_match_equal_minillm_eval(tokenizer, tmp_path):
    from minillm.generate import GenerationConfig, generate
    from minillm.model import MiniGPT
    from minillm.pretrained import save_pretrained
    from tests.conftest import micro_config

    torch.manual_seed(0)
    export = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size, block_size=128)), tokenizer, tmp_path / "m")
    model, tokenizer = load_model(str(export))
    questions, pairs = records(24)
    folder = Path("data/builtin/eval")  # the tasks read from the working directory (the test's tmp_path)
    folder.mkdir(parents=True)
    for name, rows in (("verifiable", questions), ("verifiable_pairs", pairs)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    theirs, samples = lm_eval_run(export, "minillm_verifiable_pairs", limit=20)
    logps = evaluation.completion_logps(model, tokenizer, pairs[:20])  # (20, 2): chosen, rejected
    by_prompt = {s["doc"]["prompt"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}
    lls = torch.tensor([by_prompt[p["prompt"]] for p in pairs[:20]])
    # lm-eval moves the context's trailing whitespace (the "\n" after "assistant") into each continuation, so its
    # log-likelihoods add that one token's log-prob, the same for both replies; the margins must be ours.
    torch.testing.assert_close(lls[:, 0] - lls[:, 1], logps[:, 0] - logps[:, 1], atol=1e-4, rtol=1e-5)
    ours = evaluation.preference_accuracy(logps)["accuracy"]
    assert 0 < ours < 1  # random weights: pairs won each way, so equal accuracies mean equal log-prob orderings
    assert theirs["acc,none"] == pytest.approx(ours, abs=1e-6)  # n = 20: one pair is 0.05

    theirs, samples = lm_eval_run(export, "minillm_verifiable", limit=20)
    config = GenerationConfig(do_sample=False, max_new_tokens=48)
    replies = generate(model, tokenizer, [q["conversations"][:1] for q in questions[:20]], config)
    by_question = {s["doc"]["conversations"][0]["content"]: s["filtered_resps"][0] for s in samples}
    assert [by_question[q["conversations"][0]["content"]] for q in questions[:20]] == replies  # the same greedy text
    ours_em = evaluation.exact_match_rate(model, tokenizer, questions[:20], max_new_tokens=48)["exact_match"]
    assert theirs["exact_match,none"] == pytest.approx(ours_em, abs=1e-6)  # n = 20: one pair is 0.05
