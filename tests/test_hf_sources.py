"""Hugging Face `datasets` sources (minillm/data/hf.py): local parquet, csv, json, arrow files and save_to_disk
folders give the same rows as the equivalent JSONL file; bad rows and bad mappings are named."""

import json

import datasets
import pytest

from minillm.config import DataConfig, SourceConfig
from minillm.data.datamodule import MiniLLMDataModule, corpus_lines, find_sources
from minillm.data.hf import HFSource
from minillm.data.kinds import PREFERENCE, PRETRAIN, SFT
from minillm.data.records import BadRecords, DataError
from minillm.train import build
from tests.conftest import micro_overrides

STORIES = [f"story {i}: Once upon a time, a fox met a crow. 你好！" for i in range(60)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub is reachable from tests: datasets must not try (it reads the variables at import, hence both)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def setup(tmp_path, tokenizer, sources, kind=PRETRAIN, **config):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), batch_size=2, val_ratio=0.1, **config)
    dm = MiniLLMDataModule(cfg, sources, tokenizer, block_size=16, seed=0, kind=kind, lengths=(8, 8))
    dm.setup()
    return dm


def rows(dm):
    return [r.tolist() for r in dm.train["input_ids"]], [r.tolist() for r in dm.val["input_ids"]]


def local_files(tmp_path):
    """The same stories as parquet, csv, json lines, arrow and a save_to_disk folder, in a column named story."""
    ds = datasets.Dataset.from_dict({"story": STORIES, "id": list(range(len(STORIES)))})
    ds.to_parquet(str(tmp_path / "s.parquet"))
    ds.to_csv(str(tmp_path / "s.csv"), index=False)
    ds.to_json(str(tmp_path / "s.jsonl"), force_ascii=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    return {
        "parquet file": SourceConfig(hf=str(tmp_path / "s.parquet"), columns={"text": "story"}),
        "csv builder": SourceConfig(hf="csv", data_files=str(tmp_path / "s.csv"), columns={"text": "story"}),
        "json file": SourceConfig(hf=str(tmp_path / "s.jsonl"), columns={"text": "story"}),
        "arrow builder": SourceConfig(hf="arrow", data_files=[str(arrow)], columns={"text": "story"}),
        "save_to_disk": SourceConfig(hf=str(tmp_path / "saved"), columns={"text": "story"}),
    }


def test_every_local_dataset_form_gives_the_rows_of_the_jsonl_file(tmp_path, tokenizer):
    write_jsonl(tmp_path / "data" / "stories.jsonl", [{"text": t} for t in STORIES])
    expected = rows(setup(tmp_path / "j", tokenizer, [tmp_path / "data" / "stories.jsonl"]))
    assert expected[0] and expected[1]  # both splits hold rows
    for label, source in local_files(tmp_path).items():
        dm = setup(tmp_path / label.replace(" ", "_"), tokenizer, [HFSource("stories", source)])
        assert rows(dm) == expected, label  # same records, same hash split, same packing
        assert dm.stats["sources"]["stories"]["raw_records"] == len(STORIES), label


def test_chat_and_preference_columns_are_mapped_and_parsed_like_files(tmp_path, tokenizer):
    chats = [
        [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}!"}] for i in range(40)
    ]
    write_jsonl(tmp_path / "sft" / "c.jsonl", [{"messages": m} for m in chats])
    datasets.Dataset.from_dict({"dialog": chats}).to_parquet(str(tmp_path / "c.parquet"))
    source = HFSource("c", SourceConfig(hf=str(tmp_path / "c.parquet"), columns={"messages": "dialog"}))
    file_dm = setup(tmp_path / "a", tokenizer, [tmp_path / "sft" / "c.jsonl"], kind=SFT)
    hf_dm = setup(tmp_path / "b", tokenizer, [source], kind=SFT)
    assert rows(hf_dm) == rows(file_dm)
    assert [r.tolist() for r in hf_dm.train["labels"]] == [r.tolist() for r in file_dm.train["labels"]]

    pairs = {"question": [f"Q{i}?" for i in range(30)], "good": [f"A{i}" for i in range(30)], "bad": ["no"] * 30}
    datasets.Dataset.from_dict(pairs).to_json(str(tmp_path / "p.json"))
    mapping = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    dm = setup(
        tmp_path / "p",
        tokenizer,
        [HFSource("p", SourceConfig(hf=str(tmp_path / "p.json"), columns=mapping))],
        kind=PREFERENCE,
    )
    assert dm.stats["sources"]["p"]["raw_records"] == 30 and len(dm.train) + len(dm.val) == 30


def test_a_bad_row_names_the_dataset_split_and_row(tmp_path, tokenizer):
    texts = [{"story": s} for s in STORIES[:10]] + [{"story": None}] + [{"story": s} for s in STORIES[10:30]]
    datasets.Dataset.from_list(texts).to_parquet(str(tmp_path / "s.parquet"))
    source = HFSource("s", SourceConfig(hf=str(tmp_path / "s.parquet"), columns={"text": "story"}))
    with pytest.raises(DataError, match=r"dataset .*s\.parquet \(split train\), row 10: field \"text\" must be a str"):
        setup(tmp_path / "a", tokenizer, [source])
    dm = setup(tmp_path / "b", tokenizer, [source], skip_bad_records=True)
    assert dm.stats["sources"]["s"]["bad_records"] == 1 and dm.stats["sources"]["s"]["raw_records"] == 30


def test_bad_sources_are_named_before_anything_is_read(tmp_path, tokenizer):
    datasets.Dataset.from_dict({"story": STORIES}).to_parquet(str(tmp_path / "s.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": STORIES})}).save_to_disk(str(tmp_path / "dd"))
    cases = [
        (SourceConfig(hf=str(tmp_path / "s.parquet"), columns={"text": "body"}), r"maps to \['body'\].*\['story'\]"),
        (SourceConfig(hf=str(tmp_path / "missing")), r"no dataset at .*missing: the path does not exist"),
        (SourceConfig(hf="parquet"), r"hf=parquet reads local files: set data_files"),
        (SourceConfig(hf=str(tmp_path / "dd"), split="test"), r"dd has splits \['train'\], not 'test'; set split="),
        (SourceConfig(hf="nobody/no-such-dataset"), r"offline: HF_DATASETS_OFFLINE is set"),
    ]
    for config, message in cases:
        with pytest.raises(DataError, match=message):
            setup(tmp_path / "c", tokenizer, [HFSource("s", config)])
    with pytest.raises(ValueError, match="columns: only a Hugging Face source"):
        SourceConfig(columns={"text": "story"})
    with pytest.raises(ValueError, match="columns must map our field names to column names"):
        SourceConfig(hf="x", columns="story")


def test_a_dataset_named_like_a_file_of_the_data_dir_is_refused(tmp_path, data_dir):
    config = DataConfig(dir=str(data_dir), sources={"verses": {"hf": str(tmp_path / "v.parquet")}})
    with pytest.raises(DataError, match="data.sources.verses is a Hugging Face dataset and a file of .* too"):
        find_sources(config, PRETRAIN)


def test_pretraining_from_a_parquet_file_alone_trains_its_own_tokenizer(tmp_path):
    datasets.Dataset.from_dict({"story": STORIES * 5}).to_parquet(str(tmp_path / "s.parquet"))
    source = f"+data.sources.stories={{hf: {tmp_path / 's.parquet'}, columns: {{text: story}}}}"
    overrides = [o for o in micro_overrides(tmp_path, tmp_path) if not o.startswith("data.dir=")]
    run = build([*overrides, source, "tokenizer.vocab_size=300", "tokenizer.max_chars=2000"])
    assert [str(s) for s in run.datamodule.files] == [f"dataset {tmp_path / 's.parquet'} (split train)"]
    assert run.fit() == 0 and (tmp_path / "run" / "final" / "model.safetensors").is_file()
    train_json = json.loads(next((tmp_path / "tokenizers").glob("*/tokenizer_train.json")).read_text())
    assert train_json["settings"]["max_chars"] == 2000


def test_a_data_dir_and_a_dataset_are_read_together(tmp_path, data_dir):
    datasets.Dataset.from_dict({"story": STORIES}).to_parquet(str(tmp_path / "s.parquet"))
    config = DataConfig(
        dir=str(data_dir), sources={"stories": {"hf": str(tmp_path / "s.parquet"), "columns": {"text": "story"}}}
    )
    found_dir, sources = find_sources(config, PRETRAIN)
    assert found_dir == data_dir and [s.stem for s in sources] == ["prose", "verses", "stories"]
    other_kind = DataConfig(sources={"chat": {"hf": str(tmp_path / "s.parquet"), "kind": "sft"}})
    assert find_sources(other_kind, SFT)[1][0].stem == "chat"


def test_tokenizer_max_chars_reads_only_the_start_of_a_huge_corpus(tmp_path):
    datasets.Dataset.from_dict({"text": STORIES}).to_parquet(str(tmp_path / "s.parquet"))
    source = HFSource("s", SourceConfig(hf=str(tmp_path / "s.parquet")))
    every = list(corpus_lines([source], BadRecords(skip=False)))
    assert every == STORIES
    first = list(corpus_lines([source], BadRecords(skip=False), max_chars=3 * len(STORIES[0])))
    assert first == STORIES[:3]
    other = HFSource("o", SourceConfig(hf=str(tmp_path / "s.parquet")))  # two sources: half the budget each
    assert list(corpus_lines([source, other], BadRecords(skip=False), max_chars=4 * len(STORIES[0]))) == (
        STORIES[:2] + STORIES[:2]
    )


def put_in_hub_cache(repo_id: str, columns: dict) -> None:
    """What a download of hub dataset `repo_id` leaves in the local HF cache (its Arrow files and info), made
    here from a local parquet file: the offline loader then opens `repo_id` without a network."""
    import shutil
    from pathlib import Path

    work = Path(datasets.config.HF_DATASETS_CACHE).parent / "hub_src"
    work.mkdir(parents=True)
    datasets.Dataset.from_dict(columns).to_parquet(str(work / "d.parquet"))
    built = datasets.load_dataset("parquet", data_files={"train": str(work / "d.parquet")}, split="train")
    prepared = Path(built.cache_files[0]["filename"]).parent
    namespace, name = repo_id.split("/")
    target = Path(datasets.config.HF_DATASETS_CACHE) / f"{namespace}___{name}" / "default" / "0.0.0" / prepared.name
    shutil.copytree(prepared, target)
    (target / "parquet-train.arrow").rename(target / f"{name}-train.arrow")


def test_a_hub_id_opens_from_the_local_cache_when_offline(tmp_path, tokenizer):
    put_in_hub_cache("someone/stories", {"story": STORIES})
    source = HFSource("stories", SourceConfig(hf="someone/stories", columns={"text": "story"}))
    dm = setup(tmp_path / "a", tokenizer, [source])
    assert str(source) == "dataset someone/stories (split train)"
    assert dm.stats["sources"]["stories"]["raw_records"] == len(STORIES)
    write_jsonl(tmp_path / "data" / "stories.jsonl", [{"text": t} for t in STORIES])
    assert rows(dm) == rows(setup(tmp_path / "j", tokenizer, [tmp_path / "data" / "stories.jsonl"]))


def test_empty_corrupt_and_unmatched_parquet_files_are_named(tmp_path):
    good = tmp_path / "good.parquet"
    datasets.Dataset.from_dict({"story": STORIES}).to_parquet(str(good))
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"story": []}).to_parquet(str(empty))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(good.read_bytes()[:100])  # a truncated copy
    cases = [
        (SourceConfig(hf=str(empty), columns={"text": "story"}), rf"{empty} has no rows \(an empty split\)"),
        (
            SourceConfig(hf="parquet", data_files=[str(good), str(broken)], columns={"text": "story"}),
            rf"{broken} is not a readable parquet file",
        ),
        (
            SourceConfig(hf="parquet", data_files=str(tmp_path / "shards" / "*.parquet"), columns={"text": "story"}),
            r"data.sources.s.data_files: .*shards/\*\.parquet matches no file",
        ),
    ]
    for config, message in cases:
        with pytest.raises(DataError, match=message):
            HFSource("s", config).open()
