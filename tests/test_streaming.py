"""data.streaming=true (minillm/data/stream.py): pretraining from sources read as a stream, exact resume by replay."""

import re
import signal

import datasets
import pytest
import torch

from minillm.config import SourceConfig
from minillm.data.hf import HFSource
from minillm.data.records import DataError, is_held_out
from minillm.data.stream import PretrainStream
from minillm.train import build
from tests.conftest import micro_overrides
from tests.test_train import SignalAt, train_losses

STORIES = [f"story {i}: the fox and the crow, a tale of {i % 7} cheeses." for i in range(40)]


@pytest.fixture
def stories(tmp_path):
    datasets.Dataset.from_dict({"body": STORIES}).to_parquet(str(tmp_path / "stories.parquet"))
    return f"+data.sources.stories={{hf: {tmp_path / 'stories.parquet'}, columns: {{text: body}}}}"


def stream_run(root, source, *extra):
    overrides = [o for o in micro_overrides(root, root, source, *extra) if not o.startswith("data.dir=")]
    return [*overrides, "data.streaming=true", "tokenizer.vocab_size=300", "tokenizer.max_chars=100000"]


def test_a_stream_holds_out_the_validation_records_and_is_deterministic(tmp_path, tokenizer):
    datasets.Dataset.from_dict({"text": STORIES}).to_parquet(str(tmp_path / "s.parquet"))
    source = HFSource("s", SourceConfig(hf=str(tmp_path / "s.parquet")), streaming=True)
    stream = PretrainStream([source], [1.0], [0.2], [None], False, tokenizer, window=17, seed=0)

    def seen(windows) -> set[int]:
        return {int(n) for w in windows for n in re.findall(r"story (\d+):", tokenizer.decode(w["input_ids"]))}

    held_out = {i for i, s in enumerate(STORIES) if is_held_out(s, 0.2)}
    first = list(stream)
    assert held_out and not seen(first) & held_out and len(seen(first)) > 20  # training never sees a val record
    assert seen(stream.val_windows()) <= held_out and seen(stream.val_windows())
    assert [w["input_ids"].tolist() for w in stream] == [w["input_ids"].tolist() for w in first]
    stream.epoch = 1  # the next pass: the same windows, reshuffled
    again = [w["input_ids"].tolist() for w in stream]
    assert sorted(again) == sorted(w["input_ids"].tolist() for w in first) and again != [
        w["input_ids"].tolist() for w in first
    ]


def test_ranks_get_whole_global_batches_of_their_own(tmp_path, tokenizer, monkeypatch):
    datasets.Dataset.from_dict({"text": STORIES}).to_parquet(str(tmp_path / "s.parquet"))
    source = HFSource("s", SourceConfig(hf=str(tmp_path / "s.parquet")), streaming=True)

    def windows(rank: int, world: int) -> list[list[int]]:
        monkeypatch.setattr("minillm.data.stream._world", lambda: (rank, world))
        stream = PretrainStream([source], [1.0], [0.0], [None], False, tokenizer, window=17, seed=0, batch_size=3)
        return [w["input_ids"].tolist() for w in stream]

    alone, first, second = windows(0, 1), windows(0, 2), windows(1, 2)
    assert len(first) == len(second) > 0 and len(first) % 3 == 0  # equal whole batches: no rank waits
    pairs = [w for k in range(0, len(first), 3) for w in first[k : k + 3] + second[k : k + 3]]
    assert pairs == alone[: len(pairs)]  # global batch k = rank 0's batch k, then rank 1's: each window once


def test_a_stream_without_one_whole_batch_is_an_error(tmp_path, tokenizer):
    from minillm.data.stream import StreamLoader

    datasets.Dataset.from_dict({"text": STORIES[:2]}).to_parquet(str(tmp_path / "s.parquet"))
    source = HFSource("s", SourceConfig(hf=str(tmp_path / "s.parquet")), streaming=True)
    stream = PretrainStream([source], [1.0], [0.0], [None], False, tokenizer, window=17, seed=0, batch_size=64)
    with pytest.raises(DataError, match="a whole pass over the sources gives fewer than one batch"):
        list(StreamLoader(stream, batch_size=64))


def test_streaming_resume_reproduces_the_uninterrupted_losses_across_epochs(tmp_path, stories):
    common = ["trainer.max_steps=14", "trainer.val_check_interval=4", "data.val_ratio=0.2"]
    straight = build(stream_run(tmp_path / "a", stories, *common))
    assert straight.fit() == 0
    assert straight.trainer.current_epoch >= 2  # the 14 steps cross passes over the stories
    expected = train_losses(tmp_path / "a" / "run")
    assert not (tmp_path / "a" / "datasets" / "records").exists()  # nothing materialised

    interrupted = build(stream_run(tmp_path / "b", stories, *common))
    interrupted.trainer.callbacks.append(SignalAt(9))
    assert interrupted.fit() == 128 + signal.SIGTERM
    resumed = build(stream_run(tmp_path / "b", stories, *common, "resume=auto"))
    assert torch.load(resumed.ckpt_path, weights_only=True)["global_step"] == 10
    assert resumed.fit() == 0
    assert train_losses(tmp_path / "b" / "run") == expected  # bitwise, mid-epoch resume included


def test_streaming_refuses_what_needs_the_whole_set(tmp_path, stories, chat_dir):
    with pytest.raises(ValueError, match="data.streaming=true has no length .* set trainer.max_steps"):
        build(stream_run(tmp_path / "a", stories, "trainer.max_steps=-1", "trainer.max_epochs=1"))
    with pytest.raises(ValueError, match="integer trainer.limit_train_batches would cut passes short"):
        build(stream_run(tmp_path / "a", stories, "trainer.limit_train_batches=3"))
    with pytest.raises(DataError, match="set data.num_workers=0"):
        build(stream_run(tmp_path / "b", stories, "data.num_workers=1"))
    no_sample = [o for o in stream_run(tmp_path / "c", stories) if not o.startswith("tokenizer.max_chars")]
    with pytest.raises(DataError, match="training the tokenizer would read the whole stream; set tokenizer.max_chars"):
        build(no_sample)
    pretrained = build(stream_run(tmp_path / "d", stories, "trainer.max_steps=2"))
    assert pretrained.fit() == 0
    sft = micro_overrides(tmp_path / "e", chat_dir, f"init_from={tmp_path / 'd' / 'run' / 'final'}", stage="sft")
    with pytest.raises(DataError, match="streams pretraining sources; the sft stage reads its records whole"):
        build([*sft, "data.streaming=true"])
