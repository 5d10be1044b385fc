import json
import math

import pytest

from minillm.data.records import BadRecords, read_prompts, to_prompt
from minillm.reward_rules import REWARDS, get_reward, register_reward, score, sentiment_score


def test_exact_match_ignores_spacing_and_a_final_full_stop():
    completions = ["72", " 72. ", "71", "lemon  planet rocket", "lemon rocket planet"]
    answers = ["72", "72", "72", "lemon planet rocket", "lemon planet rocket"]
    assert score("exact_match", completions, [[]] * 5, [{"answer": a} for a in answers]) == [1, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="needs an `answer` field"):
        score("exact_match", ["x"], [[]], [{"prompt": []}])


def test_sentiment_check_reads_negation_first():
    assert sentiment_score("房间很干净，服务热情，非常满意") > 0
    assert sentiment_score("太差了，很失望，不推荐") < 0
    assert sentiment_score("不好") < 0  # 不好 is negative, its 好 does not count
    completions = ["服务很好，推荐", "服务很好，推荐", "太差了", "今天下雨"]
    records = [{"sentiment": "pos"}, {"sentiment": "neg"}, {"sentiment": "neg"}, {"sentiment": "pos"}]
    assert score("sentiment", completions, [[]] * 4, records) == [1, 0, 1, 0]


def test_verifiable_checks_each_record_by_its_field():
    records = [{"answer": "5"}, {"sentiment": "pos"}, {"answer": "9"}]
    assert score("verifiable", ["5", "很好", "8"], [[]] * 3, records) == [1, 1, 0]
    unscored = score("verifiable", ["5", "x"], [[], []], [{"answer": "5"}, {"task": "add"}])
    assert unscored[0] == 1 and math.isnan(unscored[1])  # nothing to check against: left out of the update


def test_the_registry_takes_new_rewards_and_checks_them():
    @register_reward("length_test")
    def length(completions, completion_ids, **fields):
        return [len(ids) for ids in completion_ids][:1]  # wrong: one value for the batch

    assert get_reward("length_test") is REWARDS["length_test"]
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        score("length_test", ["a", "b"], [[1], [2, 3]], [{}, {}])
    with pytest.raises(ValueError, match="unknown reward.*verifiable"):
        get_reward("no_such_reward")


def test_prompt_records_in_every_format():
    user = [{"role": "user", "content": "What is 2 + 3?"}]
    assert to_prompt({"prompt": "What is 2 + 3?", "answer": "5"}) == {"prompt": user, "answer": "5"}
    assert to_prompt({"prompt": user, "chosen": "5", "rejected": "6"}) == {"prompt": user}  # a preference pair
    chat = {"conversations": user + [{"role": "assistant", "content": "5"}], "task": "add"}
    assert to_prompt(chat) == {"prompt": user, "task": "add", "answer": "5"}
    assert "end with a user" in to_prompt({"prompt": user + [{"role": "assistant", "content": "5"}]})
    assert "unknown role" in to_prompt({"prompt": [{"role": "robot", "content": "x"}]})
    assert "needs a prompt field" in to_prompt({"text": "hello"})


def test_prompt_reader_names_bad_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: prompt must be a string"):
        list(read_prompts(path, BadRecords(skip=False)))
    bad = BadRecords(skip=True)
    assert [json.loads(t)["prompt"][0]["content"] for t in read_prompts(path, bad)] == ["ok"]
