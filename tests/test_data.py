import json
import re

import pytest

from minillm.config import DataConfig, SourceConfig
from minillm.data.datamodule import MiniLLMDataModule, find_files
from minillm.data.kinds import PRETRAIN
from minillm.data.loader import ResumableLoader, ResumableSampler
from minillm.data.records import DataError, is_held_out
from minillm.train import build
from tests.conftest import micro_overrides


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def texts(n, prefix="doc"):
    return [{"text": f"{prefix} {i}: To be, or not to be, that is the question. 你好，世界！"} for i in range(n)]


def datamodule(tmp_path, tokenizer, files, **config):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), batch_size=2, **config)
    dm = MiniLLMDataModule(cfg, files, tokenizer, block_size=16, seed=0)
    dm.setup()
    return dm


def test_packing_keeps_every_token_once_with_eos_between_documents(tmp_path, tokenizer):
    write_jsonl(tmp_path / "pretrain" / "a.jsonl", texts(40))
    dm = datamodule(tmp_path, tokenizer, [tmp_path / "pretrain" / "a.jsonl"], val_ratio=0.0)
    windows = [w.tolist() for w in dm.train["input_ids"]]
    assert all(len(w) == 17 for w in windows)
    assert all(a[-1] == b[0] for a, b in zip(windows, windows[1:]))  # windows overlap by one token
    stream = windows[0] + [t for w in windows[1:] for t in w[1:]]
    docs = tokenizer.decode([t if t != tokenizer.eos_id else tokenizer.encode("|")[0] for t in stream]).split("|")
    assert docs[0] == texts(1)[0]["text"] and docs[1].startswith("doc 1:")
    assert dm.stats["packing_efficiency"] > 0.9


def test_validation_split_is_stable_when_data_is_added(tmp_path, tokenizer):
    f = tmp_path / "pretrain" / "a.jsonl"
    write_jsonl(f, texts(200))
    before = {r["text"] for r in texts(200) if is_held_out(r["text"], 0.1)}
    write_jsonl(f, texts(400))
    after = {r["text"] for r in texts(400) if is_held_out(r["text"], 0.1)}
    assert before and before <= after  # adding records never moved an old one between splits
    dm = datamodule(tmp_path, tokenizer, [f], val_ratio=0.1)
    assert dm.stats["sources"]["a"]["val_records"] == len(after)


def test_sampling_max_samples_and_per_source_ratios_are_reported(tmp_path, tokenizer):
    write_jsonl(tmp_path / "p" / "big.jsonl", texts(300, "big"))
    write_jsonl(tmp_path / "p" / "small.jsonl", texts(100, "small"))
    files = sorted((tmp_path / "p").glob("*.jsonl"))
    dm = datamodule(
        tmp_path,
        tokenizer,
        files,
        val_ratio=0.0,
        sample_ratio=0.5,
        sources={"big": SourceConfig(max_samples=40), "small": SourceConfig(sample_ratio=1.0)},
    )
    big, small = dm.stats["sources"]["big"], dm.stats["sources"]["small"]
    assert big["raw_records"] == 300 and big["sampled_records"] == 40
    assert small["raw_records"] == 100 and 30 < small["sampled_records"] < 70  # about half, by hash
    again = datamodule(
        tmp_path / "again",
        tokenizer,
        files,
        val_ratio=0.0,
        sample_ratio=0.5,
        sources={"big": SourceConfig(max_samples=40), "small": SourceConfig(sample_ratio=1.0)},
    )
    assert again.stats["sources"] == dm.stats["sources"]  # deterministic


def test_sample_offsets_split_the_records_into_disjoint_halves(tmp_path, tokenizer):
    """sample_ratio=0.5 at offsets 0 and 0.5: each record in exactly one half (the demo's reward model and its gold
    judge train on different pairs)."""
    write_jsonl(tmp_path / "p" / "a.jsonl", texts(200))
    files = [tmp_path / "p" / "a.jsonl"]
    halves = []
    for offset in (0.0, 0.5):
        dm = datamodule(tmp_path / str(offset), tokenizer, files, val_ratio=0.0, sample_ratio=0.5, sample_offset=offset)
        windows = [w.tolist() for w in dm.train["input_ids"]]
        stream = windows[0] + [t for w in windows[1:] for t in w[1:]]  # windows overlap by one token
        halves.append({d.split(":")[0] for d in tokenizer.decode(stream).split("doc ") if ":" in d})
        assert 60 < dm.stats["sources"]["a"]["sampled_records"] < 140
    assert not halves[0] & halves[1] and len(halves[0] | halves[1]) >= 190  # the tail of a packing batch is dropped


def test_unknown_source_name_is_an_error(tmp_path, tokenizer):
    write_jsonl(tmp_path / "p" / "a.jsonl", texts(10))
    with pytest.raises(DataError, match=r"data.sources names \['typo'\]"):
        datamodule(tmp_path, tokenizer, [tmp_path / "p" / "a.jsonl"], sources={"typo": SourceConfig()})
    # leaving out a file that is not there is fine (a recipe excludes another recipe's generated file)
    dm = datamodule(tmp_path, tokenizer, [tmp_path / "p" / "a.jsonl"], sources={"absent": SourceConfig(0.0)})
    assert dm.stats["sources"]


def test_txt_files_and_long_texts_are_packed_not_dropped(tmp_path, tokenizer):
    f = tmp_path / "p" / "book.txt"
    f.parent.mkdir(parents=True)
    f.write_text("\n\n".join(f"Paragraph {i}. " + "word " * 50 for i in range(30)), encoding="utf-8")
    dm = datamodule(tmp_path, tokenizer, [f], val_ratio=0.0)
    assert dm.stats["sources"]["book"]["raw_records"] == 1 + 30 * 260 // 4000
    assert dm.stats["train_tokens"] > 30 * 50 and len(dm.train) * 16 >= 0.9 * dm.stats["train_tokens"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": "broken\n', r"a\.jsonl:2: invalid JSON"),
        ('[{"text": "a"}, {"text": "b"}]\n', r"a\.jsonl:1: this looks like a JSON array"),
        ('{"text": "ok"}\n{"content": "x"}\n', r'a\.jsonl:2: field "text" must be a string, it is missing'),
        ('{"text": "ok"}\n{"text": 42}\n', r'a\.jsonl:2: field "text" must be a string, it is an int'),
        ('{"text": "ok"}\n["x"]\n', r"a\.jsonl:2: expected a JSON object, got a list"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, tokenizer, content, message):
    f = tmp_path / "p" / "a.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        datamodule(tmp_path, tokenizer, [f])


def test_bad_records_can_be_skipped_and_counted(tmp_path, tokenizer):
    f = tmp_path / "p" / "a.jsonl"
    write_jsonl(f, texts(60))
    with f.open("a") as fh:
        fh.write('{"text": "unterminated\n{"text": 3}\n')
    dm = datamodule(tmp_path, tokenizer, [f], skip_bad_records=True, val_ratio=0.0)
    assert dm.stats["sources"]["a"]["bad_records"] == 2 and dm.stats["sources"]["a"]["raw_records"] == 60


def test_non_utf8_file_is_named(tmp_path, tokenizer):
    f = tmp_path / "p" / "a.jsonl"
    f.parent.mkdir(parents=True)
    f.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:1: not UTF-8"):
        datamodule(tmp_path, tokenizer, [f])


def test_missing_and_empty_data_list_what_was_searched(tmp_path):
    (tmp_path / "pretrain").mkdir()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "pretrain" / "*.jsonl"))):
        find_files(tmp_path, PRETRAIN)
    (tmp_path / "pretrain" / "a.jsonl").write_text("")
    with pytest.raises(DataError, match="a.jsonl: the file is empty"):
        find_files(tmp_path, PRETRAIN)


def test_a_file_of_another_type_is_named_never_skipped_in_silence(tmp_path, caplog):
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "corpus.json").write_text('[{"text": "a"}]')
    with pytest.raises(DataError, match=r"It holds corpus.json, which are not read: rename them"):
        find_files(tmp_path, PRETRAIN)
    (tmp_path / "pretrain" / "b.jsonl").write_text('{"text": "b"}\n')
    assert find_files(tmp_path, PRETRAIN) == [tmp_path / "pretrain" / "b.jsonl"]
    assert "corpus.json not read (a pretrain source is *.jsonl or *.txt)" in caplog.text


def test_data_dir_resolution_prefers_the_command_line_over_the_environment(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"nowhere \(from \$MINIGPT_DATA_DIR\) does not exist"):
        build(micro_overrides(tmp_path, data_dir, "data.dir=null"))
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(data_dir))
    run = build(micro_overrides(tmp_path, data_dir, "data.dir=null"))
    assert set(run.datamodule.stats["sources"]) == {"verses", "prose"}
    with pytest.raises(DataError, match=r"missing \(from data.dir\) does not exist"):
        build(micro_overrides(tmp_path, data_dir, f"data.dir={tmp_path / 'missing'}"))
    monkeypatch.setenv("MINILLM_DATA_DIR", str(tmp_path / "first"))  # the primary spelling wins over the old one
    with pytest.raises(DataError, match=r"first \(from \$MINILLM_DATA_DIR\) does not exist"):
        build(micro_overrides(tmp_path, data_dir, "data.dir=null"))


def test_too_little_data_after_sampling_is_an_error(tmp_path, data_dir):
    with pytest.raises(DataError, match="fewer than one batch"):
        build(micro_overrides(tmp_path, data_dir, "data.sample_ratio=0.001"))


def test_second_setup_reuses_the_datasets_cache(tmp_path, tokenizer, monkeypatch):
    f = tmp_path / "p" / "a.jsonl"
    write_jsonl(f, texts(50))
    first = datamodule(tmp_path, tokenizer, [f])
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.arrow")}
    assert cached
    calls = []
    tokenize = type(PRETRAIN).tokenize
    monkeypatch.setattr(type(PRETRAIN), "tokenize", lambda self, *a, **k: calls.append(1) or tokenize(self, *a, **k))
    second = datamodule(tmp_path, tokenizer, [f])
    assert calls == []  # nothing tokenized again
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.arrow")} == cached  # no file rewritten
    assert [w.tolist() for w in second.train["input_ids"]] == [w.tolist() for w in first.train["input_ids"]]
    write_jsonl(f, texts(51))  # new content: a new fingerprint, tokenized again
    datamodule(tmp_path, tokenizer, [f])
    assert calls


def test_resumable_loader_continues_where_it_stopped():
    data = list(range(40))
    loader = ResumableLoader(data, ResumableSampler(40, batch_size=4, seed=1))
    full = [b.tolist() for b in loader]
    first = ResumableLoader(data, ResumableSampler(40, batch_size=4, seed=1))
    it = iter(first)
    head = [next(it).tolist() for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    second = ResumableLoader(data, ResumableSampler(40, batch_size=4, seed=1))
    second.load_state_dict(state)
    assert head + [b.tolist() for b in second] == full
    second.sampler.set_epoch(1)
    assert [b.tolist() for b in second] != full  # a new epoch, a new order


def test_files_of_blank_lines_and_a_split_that_holds_everything_out_say_what_to_do(tmp_path, tokenizer):
    from minillm.data.kinds import SFT

    blank = tmp_path / "sft" / "blank.jsonl"
    blank.parent.mkdir()
    blank.write_text("\n\n   \n")
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), batch_size=2)
    with pytest.raises(DataError, match=r"no sft records could be read from .*blank.jsonl.*one record per line"):
        MiniLLMDataModule(cfg, [blank], tokenizer, block_size=16, seed=0, kind=SFT).setup()
    f = tmp_path / "p" / "a.jsonl"
    write_jsonl(f, texts(20))
    half = DataConfig(cache_dir=str(tmp_path / "cache"), batch_size=10_000, val_ratio=0.5)
    with pytest.raises(DataError, match=r"holding out \d+ rows for validation; .*lower data.val_ratio"):
        MiniLLMDataModule(half, [f], tokenizer, block_size=16, seed=0).setup()
    with pytest.raises(DataError, match=r"are held out for validation.*lower data.val_ratio"):
        datamodule(tmp_path, tokenizer, [f], val_ratio=0.9999)
