"""The package as a user installs it: a wheel in a fresh venv, used from an empty folder (no clone around),
training on a local parquet file with a model preset of the user's own."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import datasets
import pytest

ROOT = Path(__file__).resolve().parent.parent
MICRO = [
    "model.n_layer=2",
    "model.n_embd=64",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.block_size=32",
    "tokenizer.vocab_size=512",
    "tokenizer.character_coverage=1.0",
    "data.batch_size=4",
    "data.val_ratio=0.1",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "optim.warmup_steps=1",
]
# presets of the user's own, next to the package's (Hydra's --config-dir), as docs/data.md and the README show
PICO = "defaults:\n  - tiny\n  - _self_\n\nname: pico\nrope_theta: 5000.0\n"
VERSES = "defaults:\n  - default\n  - _self_\n\nsources:\n  verses:\n    hf: {path}\n    columns: {{text: body}}\n"


def copy_source(src: Path) -> Path:
    """What a clone holds for packaging: the package, the top-level conf/ and the project files."""
    for folder in ("minillm", "conf"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    return src


def build_wheel(dest: Path) -> Path:
    src = dest / "src"
    copy_source(src)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", dest, src],
        check=True,
    )
    (wheel,) = dest.glob("minillm_lab-*.whl")
    return wheel


def fresh_venv(path: Path) -> Path:
    """A venv that sees this one's packages (torch, lightning, ...) but not its editable minillm."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
    (site,) = path.glob("lib/python*/site-packages")
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # a path line: its .pth files not run
    return path / "bin"


@pytest.mark.slow
def test_a_wheel_trains_on_parquet_and_generates_from_an_empty_folder(tmp_path, data_dir):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "minillm/conf/train.yaml" in names and "minillm/conf/model/tiny.yaml" in names
    assert "minillm/conf/stage/dpo.yaml" in names and "minillm/conf/generate.yaml" in names
    assert "minillm/serve.html" in names and "minillm/conf/hparams_search/tiny_optuna.yaml" in names
    bin_ = fresh_venv(tmp_path / "venv")
    pip = [sys.executable, "-m", "pip", "--python", bin_ / "python", "install", "--quiet", "--no-deps", wheel]
    subprocess.run(pip, check=True)
    work = tmp_path / "work"
    (work / "my_conf" / "model").mkdir(parents=True)
    (work / "my_conf" / "model" / "pico.yaml").write_text(PICO)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def minillm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([bin_ / "minillm", *args], cwd=work, env=env, capture_output=True, text=True)

    where = subprocess.run(
        [bin_ / "python", "-c", "import minillm; print(minillm.__file__)"], cwd=work, env=env, capture_output=True
    )
    assert str(tmp_path / "venv") in where.stdout.decode()  # the wheel's copy, not the clone's
    texts = [json.loads(line)["text"] for line in (data_dir / "pretrain" / "verses.jsonl").read_text().splitlines()]
    datasets.Dataset.from_dict({"body": texts}).to_parquet(str(tmp_path / "verses.parquet"))
    (work / "my_conf" / "data").mkdir()
    (work / "my_conf" / "data" / "verses.yaml").write_text(VERSES.format(path=tmp_path / "verses.parquet"))
    done = minillm("train", "stage=pretrain", "model=pico", "data=verses", *MICRO, "--config-dir", "my_conf")
    assert done.returncode == 0, done.stderr[-3000:]
    final = work / "outputs" / "pretrain_pico" / "final"
    assert (final / "model.safetensors").is_file() and not (work / "data" / "builtin").exists()  # parquet only
    model = json.loads((final / "minillm.json").read_text())["model"]
    assert model["name"] == "pico" and model["rope_theta"] == 5000.0  # the user's preset, over the package's tiny
    out = minillm("generate", "model_path=outputs/pretrain_pico/final", "prompt=Hello", "max_new_tokens=4", "seed=0")
    assert out.returncode == 0 and out.stdout.startswith("Hello"), out.stderr[-3000:]
    typo = minillm("generate", "model_path=outputs/pretrain_pico/final", "max_new_tokenz=4")
    assert typo.returncode != 0 and "max_new_tokenz" in typo.stderr


@pytest.mark.slow
def test_an_editable_install_finds_the_top_level_conf_from_another_folder(tmp_path):
    src = copy_source(tmp_path / "src")
    bin_ = fresh_venv(tmp_path / "venv")
    pip = [sys.executable, "-m", "pip", "--python", bin_ / "python", "install", "--quiet", "--no-deps"]
    subprocess.run([*pip, "--no-build-isolation", "-e", src], check=True)
    tiny = src / "conf" / "model" / "tiny.yaml"
    tiny.write_text(tiny.read_text().replace("n_layer: 6", "n_layer: 3"))
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    job = subprocess.run(
        [bin_ / "minillm", "train", "stage=pretrain", "model=tiny", "--cfg", "job"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "n_layer: 3" in job.stdout  # the checkout's conf/, edited after the install, is the one read
