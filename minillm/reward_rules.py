"""Rule-based reward functions, by name: `stage.reward=<name>` (or `stage.reward=model` for a trained reward model).

A reward function takes the batch's completions (decoded text), their token ids and the prompt records' fields
as keyword lists (`answer=[...]`, `sentiment=[...]`, as TRL passes dataset columns), and returns one float per
completion — or None for a completion it cannot judge (a prompt of another task): as in TRL, such a completion
is left out of the update (`score` turns None into NaN). Add your own with the decorator, in any module
imported before training starts:

    @register_reward("shorter")
    def shorter(completions, completion_ids, **fields):
        return [-len(ids) / 100 for ids in completion_ids]
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

RewardFn = Callable[..., list[float]]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return add


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(
            f"stage.reward={name}: unknown reward; use `model` (a trained reward model) or one of "
            f"{sorted(REWARDS)} (register more with minillm.reward_rules.register_reward)"
        )
    return REWARDS[name]


def score(name: str, completions: list[str], completion_ids: list[list[int]], records: Sequence[dict]) -> list[float]:
    """Call reward `name` with the records' fields as keyword lists; check it returned one value each (None: NaN)."""
    fields = {k: [r.get(k) for r in records] for k in sorted({k for r in records for k in r})}
    values = get_reward(name)(completions, completion_ids, **fields)
    if len(values) != len(completions):
        raise ValueError(f"reward {name} returned {len(values)} values for {len(completions)} completions")
    return [math.nan if v is None else float(v) for v in values]


def _normalise(text: str) -> str:
    return " ".join(text.strip().split()).rstrip(".。!！")


@register_reward("exact_match")
def exact_match(completions: list[str], completion_ids, answer: list | None = None, **_) -> list[float]:
    """1.0 when the completion is the record's exact `answer` (whitespace and a final full stop aside), else 0."""
    if answer is None or any(a is None for a in answer):
        raise ValueError(
            "stage.reward=exact_match needs an `answer` field in every prompt record "
            "(e.g. <data dir>/prompts/verifiable.jsonl)"
        )
    return [float(_normalise(c) == _normalise(str(a))) for c, a in zip(completions, answer)]


# A small sentiment lexicon for Chinese product and hotel reviews; negated and negative phrases are matched
# (and removed) first, so that 不好 counts as negative and not as 好.
NEGATIVE = (
    "不推荐",
    "不干净",
    "不方便",
    "不舒服",
    "不满意",
    "不值",
    "不好",
    "不如",
    "很差",
    "太差",
    "差的",
    "失望",
    "郁闷",
    "麻烦",
    "根本",
    "简直",
    "居然",
    "竟然",
    "垃圾",
    "糟糕",
    "退货",
    "投诉",
    "恶心",
    "骗",
    "无语",
    "脏",
    "烂",
    "后悔",
    "怎么",
    "实在",
    "差",
)
POSITIVE = (
    "不错",
    "很好",
    "非常好",
    "漂亮",
    "完美",
    "超值",
    "周到",
    "流畅",
    "感动",
    "温馨",
    "实惠",
    "值得",
    "满意",
    "喜欢",
    "推荐",
    "棒",
    "优秀",
    "舒适",
    "热情",
    "赞",
    "性价比",
    "很快",
    "方便",
    "干净",
    "舒服",
    "好",
)


def sentiment_score(text: str) -> int:
    """(positive - negative) lexicon hits."""
    negatives = 0
    for word in NEGATIVE:
        negatives += text.count(word)
        text = text.replace(word, " ")
    return sum(text.count(word) for word in POSITIVE) - negatives


@register_reward("sentiment")
def sentiment_match(
    completions: list[str], completion_ids, sentiment: list[str | None] | None = None, **_
) -> list[float]:
    """1.0 when the completion's lexicon sentiment has the sign the record asks for (`sentiment`: pos / neg;
    pos when a record has none), else 0."""
    wanted = sentiment or [None] * len(completions)
    out = []
    for text, want in zip(completions, wanted):
        s = sentiment_score(re.sub(r"\s+", "", text))
        out.append(float(s < 0 if want == "neg" else s > 0))
    return out


@register_reward("verifiable")
def verifiable(
    completions: list[str], completion_ids, answer: list | None = None, sentiment: list | None = None, **_
) -> list[float]:
    """Each record checked by what it carries: an `answer` by exact match (the verifiable family), a `sentiment`
    by the sentiment check (the review prompts); None (not scored) for a record with neither."""
    n = len(completions)
    answer, sentiment = answer or [None] * n, sentiment or [None] * n
    out = []
    for text, a, s in zip(completions, answer, sentiment):
        if a is not None:
            out += exact_match([text], None, answer=[a])
        elif s is not None:
            out += sentiment_match([text], None, sentiment=[s])
        else:
            out.append(None)
    return out
