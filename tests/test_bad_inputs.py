"""Bad input, one case each: a clear message naming the file/line or key, and nothing in an existing run
directory overwritten or lost. In-process (exception type + message), plus one subprocess case for exit codes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from minillm.data.records import DataError
from minillm.generate import load_model
from minillm.rundir import ResumeError
from minillm.signals import CommandSignals
from minillm.tokenizer import Tokenizer
from minillm.train import build
from tests.conftest import micro_overrides


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".ckpt", ".safetensors", ".json")
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A completed micro pretraining run: the run dir every case must leave as it was."""
    root = tmp_path_factory.mktemp("finished")
    assert build(micro_overrides(root, data_dir)).fit() == 0
    return root


def data_with(tmp_path: Path, source: Path, name: str, content: bytes | str) -> Path:
    """The fixture's pretraining files plus one more."""
    root = tmp_path / "bad_data"
    shutil.copytree(source / "pretrain", root / "pretrain")
    path = root / "pretrain" / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


GOOD = "\n".join(json.dumps({"text": f"line {i} to be or not to be that is the question"}) for i in range(200)) + "\n"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.jsonl", GOOD.encode() + b'{"text": "caf\xe9"}\n', r"a\.jsonl:201: not UTF-8"),
        (
            "a.jsonl",
            GOOD + '{"text": "cut in the mid',
            r"a\.jsonl:201: invalid JSON at column 10 \(Unterminated string starting\)",
        ),
        ("b.txt", b"Para one.\n\nPara two\n" + b"caf\xe9\n", r"b\.txt:4: not UTF-8"),
        ("a.jsonl", json.dumps([{"text": "x"}]), r"a\.jsonl:1: this looks like a JSON array; JSON Lines is expected"),
        (
            "a.jsonl",
            GOOD + json.dumps({"text": 5}) + "\n",
            r'a\.jsonl:201: field "text" must be a string, it is an int',
        ),
        ("a.jsonl", GOOD + json.dumps(["text"]) + "\n", r"a\.jsonl:201: expected a JSON object, got a list"),
    ],
    ids=["non-utf8", "truncated-jsonl", "non-utf8-txt", "json-array", "wrong-type", "not-an-object"],
)
def test_malformed_pretraining_files(tmp_path, data_dir, name, content, message):
    data = data_with(tmp_path, data_dir, name, content)
    with pytest.raises(DataError, match=message):
        build(micro_overrides(tmp_path, data))
    assert not (tmp_path / "run").exists()  # nothing written before the data is known to be good


def test_conversation_with_an_unknown_role(tmp_path, pretrained):
    (tmp_path / "d" / "sft").mkdir(parents=True)
    msgs = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    (tmp_path / "d" / "sft" / "c.jsonl").write_text(json.dumps({"conversations": msgs}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:1: message 1 has unknown role 'robot'"):
        build(micro_overrides(tmp_path, tmp_path / "d", f"init_from={pretrained}", stage="sft"))


def test_preference_pair_with_a_missing_field(tmp_path, pretrained):
    (tmp_path / "d" / "preference").mkdir(parents=True)
    (tmp_path / "d" / "preference" / "p.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: a preference pair needs chosen and rejected"):
        build(
            micro_overrides(
                tmp_path,
                tmp_path / "d",
                f"init_from={pretrained}",
                "stage.max_prompt_length=20",
                "stage.max_completion_length=12",
                stage="dpo",
            )
        )


def test_an_empty_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no pretrain data in .*empty: looked for .*pretrain/\*\.jsonl"):
        build(micro_overrides(tmp_path, tmp_path / "empty"))


def test_a_training_split_emptied_by_sampling(tmp_path, data_dir):
    with pytest.raises(DataError, match=r"fewer than one batch .*data.sample_ratio"):
        build(micro_overrides(tmp_path, data_dir, "data.sample_ratio=0.001"))


def test_block_size_beyond_the_model_maximum(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"block_size must be in 1\.\.65536"):
        build(micro_overrides(tmp_path, data_dir, "model.block_size=100000"))


def test_vocab_size_mismatch_between_tokenizer_and_checkpoint(tmp_path, data_dir, finished):
    with pytest.raises(ValueError, match=r"model.vocab_size=300 but the tokenizer has 512 pieces"):
        build(micro_overrides(tmp_path, data_dir, "model.vocab_size=300"))
    shutil.copytree(finished / "run" / "final", tmp_path / "final")
    from minillm.tokenizer import TokenizerConfig, train_tokenizer

    tok = train_tokenizer(
        ["some other corpus text"] * 50, tmp_path / "tok2", TokenizerConfig(vocab_size=300, character_coverage=1.0)
    )
    shutil.copy(tok.path, tmp_path / "final" / "tokenizer.model")  # weights opened with another tokenizer
    with pytest.raises(
        ValueError, match=r"trained with tokenizer sha256 .* use the tokenizer saved with these weights"
    ):
        load_model(str(tmp_path / "final"))


def test_a_corrupt_tokenizer_model_file(tmp_path, finished):
    shutil.copytree(finished / "run" / "final", tmp_path / "final")
    (tmp_path / "final" / "tokenizer.model").write_bytes(b"\x00garbage, not a sentencepiece model")
    with pytest.raises(ValueError, match=r"tokenizer\.model is not a valid sentencepiece model") as refused:
        load_model(str(tmp_path / "final"))
    assert "checkpoints/tokenizer.model" in str(refused.value) and "retrain" not in str(refused.value)
    (tmp_path / "cached").mkdir()  # a tokenizer on its own (the cache): retraining it is the remedy
    (tmp_path / "cached" / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"retrain the tokenizer \(tokenizer.retrain=true\)"):
        Tokenizer(tmp_path / "cached")


def test_a_truncated_checkpoint(tmp_path, finished, data_dir):
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run)
    last = run / "checkpoints" / "last.ckpt"
    cut = run / "checkpoints" / "truncated.ckpt"
    cut.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(ResumeError, match=r"cannot load .*truncated\.ckpt .*corrupt"):
        build(micro_overrides(tmp_path, data_dir, f"resume={cut}"))
    with pytest.raises(ValueError, match=r"cannot load checkpoint .*truncated\.ckpt safely"):
        load_model(str(cut))


def test_a_checkpoint_from_another_preset(tmp_path, finished, data_dir):
    before = fingerprint(finished / "run")
    with pytest.raises(ResumeError, match=r"different model shape \(model.n_layer: 2 -> 3"):
        build(micro_overrides(finished, data_dir, "resume=auto", "model.n_layer=3"))
    assert fingerprint(finished / "run") == before


def test_nan_in_the_loss_skips_updates_then_halts_with_a_checkpoint(tmp_path, data_dir, monkeypatch):
    from minillm.stages.pretrain import PretrainModule

    real = PretrainModule.training_step

    def poisoned(self, batch, batch_idx):
        return real(self, batch, batch_idx) * float("nan")

    monkeypatch.setattr(PretrainModule, "training_step", poisoned)
    run = build(
        micro_overrides(tmp_path, data_dir, "trainer.max_steps=20", "callbacks.grad_monitor.halt_on_nonfinite=3")
    )
    start = {k: v.clone() for k, v in run.module.model.state_dict().items()}
    assert run.fit() == 1
    assert all(torch.equal(v, run.module.model.state_dict()[k]) for k, v in start.items())  # no update applied
    assert list((tmp_path / "run" / "checkpoints").glob("halt-step-*.ckpt"))
    assert not (tmp_path / "run" / "final").exists()


def test_disk_full_while_saving_keeps_existing_checkpoints(tmp_path, finished, data_dir, monkeypatch):
    from minillm.checkpoint_io import AtomicCheckpointIO

    run_dir = tmp_path / "run"
    shutil.copytree(finished / "run", run_dir)
    before = fingerprint(run_dir / "checkpoints")

    def disk_full(cls, f, data):
        f.write(data[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AtomicCheckpointIO, "_write", classmethod(disk_full))
    run = build(micro_overrides(tmp_path, data_dir, "resume=auto", "trainer.max_steps=8", "resume_allow_changes=true"))
    with pytest.raises(OSError, match="No space left on device"):
        run.fit()
    after = fingerprint(run_dir / "checkpoints")
    assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_an_output_path_under_a_regular_file(tmp_path, data_dir):
    (tmp_path / "afile").write_text("I am a file")
    with pytest.raises(ValueError, match=r"run_dir=.*afile/run: .*afile is a file, not a folder"):
        build(micro_overrides(tmp_path, data_dir, f"run_dir={tmp_path}/afile/run"))


def test_unknown_override_keys(tmp_path, data_dir):
    with pytest.raises(ConfigCompositionException, match=r"optim\.learning_rate"):
        build(micro_overrides(tmp_path, data_dir, "optim.learning_rate=1e-3"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=0", r"optim.lr must be > 0, got 0"),
        ("optim.lr=-1e-3", r"optim.lr must be > 0"),
        ("data.batch_size=0", r"data.batch_size must be >= 1, got 0"),
        ("data.batch_size=-4", r"data.batch_size must be >= 1"),
    ],
)
def test_non_positive_lr_or_batch_size(tmp_path, data_dir, override, message):
    with pytest.raises(ValueError, match=message):
        build(micro_overrides(tmp_path, data_dir, override))


@pytest.mark.slow
def test_exit_codes_from_the_command_line(tmp_path, data_dir):
    def train(*extra):
        return subprocess.run(
            [sys.executable, "-m", "minillm.train", *micro_overrides(tmp_path, data_dir, *extra)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )

    bad_value = train("optim.lr=0")
    assert bad_value.returncode == 2 and "optim.lr must be > 0" in bad_value.stdout + bad_value.stderr
    unknown = train("optim.learning_rate=1")
    assert unknown.returncode == 1 and "optim.learning_rate" in unknown.stderr
    written = {p.name for p in (tmp_path / "run").rglob("*") if p.is_file()} if (tmp_path / "run").exists() else set()
    assert written <= {"train.log", "config.yaml", "hydra.yaml", "overrides.yaml"}  # Hydra's own records only


def test_resuming_from_a_checkpoint_with_a_pickle_payload_never_runs_it(tmp_path, data_dir, finished):
    import os
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run_dir = tmp_path / "run"
    shutil.copytree(finished / "run", run_dir)
    evil = run_dir / "checkpoints" / "evil-step-999999.ckpt"
    with evil.open("wb") as f:
        pickle.dump({"global_step": 999999, "state_dict": {}, "hyper_parameters": Payload()}, f, protocol=2)
    with pytest.raises(ResumeError, match=r"cannot load .*evil-step-999999\.ckpt"):
        build(micro_overrides(tmp_path, data_dir, f"resume={evil}"))
    zipped = run_dir / "checkpoints" / "evil-zip.ckpt"  # torch.save's format, as a real checkpoint would be
    torch.save({"global_step": 999999, "state_dict": {}, "hyper_parameters": Payload()}, zipped)
    with pytest.raises(ResumeError, match=r"evil-zip\.ckpt holds pickled Python objects") as refused:
        build(micro_overrides(tmp_path, data_dir, f"resume={zipped}"))
    assert str(refused.value).endswith("Nothing was changed.") and "weights_only" not in str(refused.value)
    auto = build(micro_overrides(tmp_path, data_dir, "resume=auto"))  # auto skips it and takes the real latest
    assert auto.ckpt_path is not None and "evil" not in auto.ckpt_path.name
    assert not marker.exists()


def test_the_json_array_hint_is_safe_to_run_as_printed(tmp_path, data_dir):
    records = [{"text": f"record {i}, to be or not to be"} for i in range(30)]
    original = json.dumps(records, ensure_ascii=False).encode()
    data = data_with(tmp_path, data_dir, "a.jsonl", original)
    with pytest.raises(DataError) as refused:
        build(micro_overrides(tmp_path, data))
    command = str(refused.value).split("\n  ", 1)[1]
    assert not re.search(r"a\.jsonl > a\.jsonl(\s|$)", command)  # never reads and writes the same path
    done = subprocess.run(["bash", "-c", command.replace("python -c", f"{sys.executable} -c")], capture_output=True)
    assert done.returncode == 0, done.stderr
    folder = data / "pretrain"
    assert (folder / "a.jsonl.array.bak").read_bytes() == original  # the user's file, byte for byte
    assert [json.loads(line) for line in (folder / "a.jsonl").read_text().splitlines()] == records
    assert build(micro_overrides(tmp_path, data)).datamodule.stats["sources"]["a"]["raw_records"] == 30


@pytest.mark.parametrize(
    "overrides",
    [("+data.sources.verses.sample_ratio=0", "+data.sources.prose.sample_ratio=0"), ("data.sample_ratio=0.0001",)],
    ids=["every-source-at-ratio-0", "a-tiny-global-ratio"],
)
def test_sampling_that_leaves_no_training_records(tmp_path, data_dir, overrides):
    with pytest.raises(
        DataError, match=r"no training records in .*: of \d+ records, 0 are bad .* left out by sampling"
    ):
        build(micro_overrides(tmp_path, data_dir, *overrides))


def test_a_source_capped_at_zero_samples(tmp_path, data_dir):
    overrides = ("+data.sources.verses.max_samples=0", "+data.sources.prose.max_samples=0")
    with pytest.raises(DataError, match=r"left out by sampling \(data.sample_ratio, data.sources.<name>.sample_ratio"):
        build(micro_overrides(tmp_path, data_dir, *overrides))


def test_pretraining_data_where_every_record_is_bad(tmp_path):
    folder = tmp_path / "all_bad" / "pretrain"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text("".join(json.dumps({"txt": f"wrong field {i}"}) + "\n" for i in range(20)))
    overrides = micro_overrides(tmp_path, tmp_path / "all_bad", "data.skip_bad_records=true")
    with pytest.raises(
        ValueError,
        match=r'no text to train the tokenizer on .*all 20 records are bad, the first: .*a\.jsonl:1: field "text"',
    ):
        build(overrides)


def test_chat_data_where_every_record_is_bad(tmp_path, pretrained):
    folder = tmp_path / "chat_bad" / "sft"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_text("".join(json.dumps({"chat": i}) + "\n" for i in range(12)))
    overrides = micro_overrides(
        tmp_path, tmp_path / "chat_bad", f"init_from={pretrained}", "data.skip_bad_records=true", stage="sft"
    )
    with pytest.raises(DataError, match=r"no training records in a\.jsonl: of 12 records, 12 are bad"):
        build(overrides)


def test_a_run_dir_on_a_read_only_disk(tmp_path, data_dir):
    with pytest.raises(
        ValueError, match=r"run_dir=/sys/minillm-run: /sys is not writable .* choose a run_dir on a writable"
    ):
        build(micro_overrides(tmp_path, data_dir, "run_dir=/sys/minillm-run"))


@pytest.mark.parametrize("key", ["tokenizer.cache_dir", "data.cache_dir"])
def test_a_cache_in_a_read_only_folder_names_its_key(tmp_path, data_dir, key):
    with pytest.raises(ValueError, match=rf"{key}=/sys/minillm-cache: /sys is not writable .* set {key}= to a"):
        build(micro_overrides(tmp_path, data_dir, f"{key}=/sys/minillm-cache"))
    assert not (tmp_path / "run").exists()


def test_resuming_a_read_only_run_dir_says_to_resume_a_copy(tmp_path, data_dir, finished, monkeypatch):
    from minillm import rundir

    monkeypatch.setattr(rundir, "_writable", lambda folder: not str(folder).startswith(str(finished)))
    with pytest.raises(ValueError, match=r"is not writable .* copy the run dir to a writable place .* resume=auto"):
        build(micro_overrides(tmp_path, data_dir, f"run_dir={finished / 'run'}", "resume=auto"))


def test_max_steps_zero_is_refused(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"trainer.max_steps=0 trains nothing"):
        build(micro_overrides(tmp_path, data_dir, "trainer.max_steps=0"))
    assert not (tmp_path / "run").exists()


def test_an_added_key_no_schema_has(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"unknown config key optim.lrr; the keys of optim are: lr, weight_decay"):
        build(micro_overrides(tmp_path, data_dir, "+optim.lrr=1"))


def test_export_into_a_file_or_a_folder_with_files(tmp_path, finished, capsys):
    from minillm import export

    model = finished / "run" / "final"
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine too")
    for out, message in (("afile", "is a file, not a folder"), ("full", r"already holds files \(notes.txt\)")):
        with pytest.raises(SystemExit) as stopped:
            export.main([f"model_path={model}", f"out={tmp_path / out}"])
        assert stopped.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    assert (tmp_path / "afile").read_text() == "mine" and (tmp_path / "full" / "notes.txt").read_text() == "mine too"
    export.main([f"model_path={model}", f"out={tmp_path / 'full'}", "overwrite=true"])
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_a_damaged_safetensors_file(tmp_path, finished):
    folder = tmp_path / "model"
    shutil.copytree(finished / "run" / "final", folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(
        ValueError, match=r"cannot read the weights .*model\.safetensors .*damaged or not a safetensors"
    ):
        load_model(str(folder))


def test_init_from_a_transformers_folder_without_minillm_json(tmp_path, data_dir, finished):
    from minillm.export import export

    folder = export(finished / "run" / "final", tmp_path / "hf")
    (folder / "minillm.json").unlink()
    run = build(micro_overrides(tmp_path, data_dir, f"init_from={folder}", "trainer.max_steps=1"))
    assert run.module.model.config.ffn_dim == json.loads((folder / "config.json").read_text())["intermediate_size"]


def test_init_from_keeps_its_tokenizer_and_says_so(tmp_path, data_dir, finished, caplog):
    model = finished / "run" / "final"
    run = build(micro_overrides(tmp_path, data_dir, f"init_from={model}", "tokenizer.vocab_size=600"))
    assert "tokenizer.vocab_size=600 is not used: the tokenizer comes with init_from" in caplog.text
    snapshot = json.loads((tmp_path / "run" / "training_config_snapshot.json").read_text())
    assert snapshot["config"]["tokenizer"]["vocab_size"] == run.datamodule.tokenizer.vocab_size == 512


def test_resuming_with_other_init_weights_names_them(tmp_path, data_dir, finished, pretrained):
    first = build(micro_overrides(tmp_path, data_dir, f"init_from={finished / 'run' / 'final'}", "trainer.max_steps=2"))
    assert first.fit() == 0
    with pytest.raises(
        ResumeError, match=r"started from init weights with sha256 .* \(the parent stage was retrained\)"
    ):
        build(micro_overrides(tmp_path, data_dir, f"init_from={pretrained}", "resume=auto"))


@pytest.fixture
def signal_handlers():
    """CommandSignals leaves its exit-now handlers installed (the command is the process): restore them. Each test
    starts with Python's own SIGINT handler, as in a terminal: a suite started in the background (`nohup`, `&` in a
    script) inherits SIGINT ignored, which CommandSignals rightly keeps, and the signal tests would see nothing."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _signal_inside_a_library(sig: int, wrap) -> None:
    """A signal lands in library code that turns the KeyboardInterrupt into something else (OmegaConf wraps it
    in a ValueError subclass, Lightning prints a line and exits 1, Hydra reports an error and exits 1)."""
    try:
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler runs before this returns
    except KeyboardInterrupt as e:
        wrap(e)
    raise AssertionError("the signal did not interrupt")


def _as_value_error(e):
    raise ValueError("wrapped by the library") from e


@pytest.mark.parametrize(
    ("sig", "wrap", "code"),
    [
        (signal.SIGINT, _as_value_error, 130),  # main() exits 2 on a ValueError: a "bad input" code before the fix
        (signal.SIGTERM, lambda e: sys.exit(1), 143),
        (signal.SIGINT, lambda e: None, 130),  # swallowed: the command still ends as interrupted
    ],
)
def test_a_signal_outside_training_exits_128_plus_n_whatever_the_library_makes_of_it(
    signal_handlers, capsys, sig, wrap, code
):
    with pytest.raises(SystemExit) as exit, CommandSignals():
        try:
            _signal_inside_a_library(sig, wrap)
        except ValueError:  # as main() treats a user error
            sys.exit(2)
        except AssertionError:
            pass
    assert exit.value.code == code
    err = capsys.readouterr().err
    assert "interrupted before training started" in err and "Traceback" not in err


def test_without_a_signal_the_command_keeps_its_own_errors_and_exit_codes(signal_handlers):
    with pytest.raises(ValueError, match="a user error"), CommandSignals():
        raise ValueError("a user error")
    with pytest.raises(SystemExit) as exit, CommandSignals():
        sys.exit(2)
    assert exit.value.code == 2


def test_a_sigint_ignored_by_the_parent_stays_ignored(signal_handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # `nohup` / `&`
    with CommandSignals():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.slow
def test_user_errors_before_hydra_and_ctrl_c_at_start_up(tmp_path, data_dir):
    def train(*extra, **kwargs):
        cmd = [sys.executable, "-m", "minillm.train", *micro_overrides(tmp_path, data_dir, *extra)]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, **kwargs)

    (tmp_path / "afile").write_text("a file")
    for run_dir, message in (
        (tmp_path / "afile" / "run", "is a file, not a folder"),
        ("/sys/minillm-run", "not writable"),
    ):
        refused = train(f"run_dir={run_dir}")
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr
    assert (tmp_path / "afile").read_text() == "a file"
    typo = train("+optim.lrr=1")
    assert typo.returncode == 2 and "unknown config key optim.lrr" in typo.stdout + typo.stderr
    assert "Traceback" not in typo.stderr

    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "minillm.train", *micro_overrides(tmp_path / "c", data_dir, "resume=auto")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a test run in the background (nohup, `&`) hands its children SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in proc.stdout:  # Ctrl-C while the tokenizer and the dataset are being built
        if "starting fresh" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, (out[-2000:], err[-2000:])
    assert "interrupted before training started" in err
