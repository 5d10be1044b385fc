import pytest

from minillm.data.records import to_messages, to_preference

PROMPT = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {
            "prompt": PROMPT,
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
        {
            "chosen": PROMPT + [{"role": "assistant", "content": "Hello!"}],
            "rejected": PROMPT + [{"role": "assistant", "content": "Go away."}],
        },
    ],
)
def test_preference_formats_normalise_to_the_same_pair(record):
    assert to_preference(record) == {"prompt": PROMPT, "chosen": "Hello!", "rejected": "Go away."}


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, "are the same"),
        ({"prompt": "Hi", "chosen": " ", "rejected": "x"}, "empty completion"),
        ({"prompt": "Hi", "chosen": "x"}, "needs chosen and rejected"),
        (
            {
                "chosen": PROMPT + [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "Other"}, {"role": "assistant", "content": "b"}],
            },
            "differ only",
        ),
        ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt: message 0"),
    ],
)
def test_bad_preference_pairs_say_what_is_wrong(record, problem):
    result = to_preference(record)
    assert isinstance(result, str) and problem in result


def test_messages_keep_system_prompts_and_every_turn():
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "A"},
            {"role": "assistant", "content": "1"},
            {"role": "user", "content": "B"},
            {"role": "assistant", "content": "2"},
        ],
        "extra": "ignored",
    }
    assert [m["role"] for m in to_messages(record)] == ["system", "user", "assistant", "user", "assistant"]
