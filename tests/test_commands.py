"""The one command line (minillm/cli.py): every command is a Hydra app over the package's config tree."""

import json
import subprocess
import sys

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from minillm import cli
from minillm.model import MiniGPT
from minillm.pretrained import save_pretrained
from tests.conftest import micro_config

# a key of each command's schema that --help must show
SCHEMA_KEY = {
    "train": "init_from",
    "debug": "show_tokens",
    "device": "run_dir",
    "generate": "prompt_file",
    "chat": "system",
    "eval": "reward_model",
    "report": "targets",
    "export": "overwrite",
    "serve": "max_batch",
    "pairs": "family",
    "sweep": "sweeps",
    "data": "force",
}


@pytest.fixture(autouse=True)
def _fresh_hydra(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["minillm"])  # the dispatcher rewrites it; restored after each test
    yield
    GlobalHydra.instance().clear()


def test_every_command_is_listed_and_documented():
    assert set(SCHEMA_KEY) == set(cli.COMMANDS)


@pytest.mark.parametrize("name", sorted(SCHEMA_KEY))
def test_help_shows_the_keys_of_the_command(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"minillm {name}" in out and f"{SCHEMA_KEY[name]}:" in out


def test_help_and_the_commands_that_do_not_train_load_neither_torch_nor_lightning(tmp_path, tokenizer):
    """`--help` of every command without torch; generate, eval, report and export run without Lightning."""
    folder = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "m")
    script = f"""
import contextlib, io, sys
from minillm import cli
for name in cli.COMMANDS:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            cli.main([name, "--help"])
        except SystemExit as e:
            assert e.code == 0 and f"minillm {{name}}" in out.getvalue(), (name, e.code)
assert "torch" not in sys.modules and "lightning" not in sys.modules, "--help loaded torch"
with contextlib.redirect_stdout(io.StringIO()):
    cli.main(["generate", "model_path={folder}", "prompt=Hi", "max_new_tokens=2"])
    cli.main(["eval", "model_path={folder}", "eval.tasks=[samples]", "eval.limit=1", "eval.max_new_tokens=2"])
    cli.main(["export", "model_path={folder}", "out={tmp_path / "hf"}"])
assert "torch" in sys.modules, "the commands ran"
print(sorted(m for m in sys.modules if m.split(".")[0] == "lightning"))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("name", sorted(SCHEMA_KEY))
def test_a_typo_is_an_error_that_names_the_key(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "no_such_key=1"])
    assert exit_.value.code not in (0, None)
    assert "no_such_key" in capsys.readouterr().err


def test_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["trian"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and all(f"  {name} " in err for name in cli.COMMANDS)
    cli.main([])
    assert "usage: minillm <command>" in capsys.readouterr().out


def test_a_command_run_from_another_folder_writes_nothing_there(tmp_path, tokenizer, monkeypatch, capsys):
    torch.manual_seed(0)
    folder = save_pretrained(MiniGPT(micro_config(tokenizer.vocab_size)), tokenizer, tmp_path / "m")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cli.main(["generate", f"model_path={folder}", "prompt=Hello", "max_new_tokens=3", "seed=0"])
    assert capsys.readouterr().out.startswith("Hello")
    assert list(work.iterdir()) == []  # no .hydra/, no log file, no outputs/


def test_eval_sweeps_several_models_in_one_command(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "t.jsonl").write_text(
        "".join(json.dumps({"text": f"Line {i}: to be or not to be."}) + "\n" for i in range(300))
    )
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = MiniGPT(micro_config(tokenizer.vocab_size))
        folders.append(save_pretrained(model, tokenizer, tmp_path / f"m{seed}"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cli.main(["eval", "-m", f"model_path={folders[0]},{folders[1]}", f"eval.data_dir={tmp_path}", "eval.tasks=[bpb]"])
    bpb = [json.loads((f / "eval.json").read_text())["tasks"]["bpb"]["bpb"] for f in folders]
    assert all(b > 0 for b in bpb) and bpb[0] != bpb[1]  # each job evaluated its own model
    assert [p.name for p in (work / "outputs" / "sweeps" / "eval").glob("*/multirun.yaml")] == ["multirun.yaml"]


def test_a_config_dir_that_does_not_exist_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--config-dir", str(tmp_path / "my_conf"), "model_path=x"])
    assert exit_.value.code not in (0, None)
    assert f"Additional config directory '{tmp_path / 'my_conf'}' not found" in capsys.readouterr().err


def test_a_yaml_syntax_error_in_a_users_preset_is_one_line_with_file_line_and_column(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "pico.yaml").write_text("defaults:\n  - tiny\nname: [pico\nn_layer: 4\n")
    (tmp_path / "model" / "fine.yaml").write_text("name: fine\n")
    with pytest.raises(SystemExit) as stop:
        cli.check_config_dirs(["stage=pretrain", "--config-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / 'model' / 'pico.yaml'}:4:") and "(YAML syntax)" in err
    (tmp_path / "model" / "pico.yaml").write_text("name: pico\n")
    cli.check_config_dirs(["-cd", str(tmp_path)])  # valid presets: nothing said
    assert capsys.readouterr().err == ""
