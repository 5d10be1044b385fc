from pathlib import Path

import hydra
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from minillm.config import CONF_DIR, STAGES, compose, run_names, to_config

PRESETS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
STAGE_FILES = sorted(p.stem for p in (CONF_DIR / "stage").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_every_stage_yaml_has_a_module():
    assert set(STAGE_FILES) == set(STAGES)


@pytest.mark.parametrize("stage", STAGE_FILES)
@pytest.mark.parametrize("model", PRESETS)
def test_every_stage_and_model_composes_into_valid_dataclasses(stage, model):
    cfg = compose([f"stage={stage}", f"model={model}"])
    typed = to_config(cfg)
    assert typed.stage.name == stage and typed.model.name == model
    assert cfg.run_dir == f"outputs/{stage}_{model}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose_and_set_steps(experiment):
    # demo_dpo is for stage=dpo (it may set stage.* keys), demo_reward_gold for stage=reward
    stage = (experiment.split("_") + ["pretrain"])[1]
    cfg = compose([f"stage={stage}", f"experiment={experiment}"])
    assert cfg.trainer.max_steps > 0 and cfg.callbacks.checkpoint.every_n_train_steps > 0


def test_stage_defaults_apply_and_the_command_line_wins():
    stage_file = OmegaConf.load(CONF_DIR / "stage" / "pretrain.yaml")
    cfg = compose(["stage=pretrain"])
    assert cfg.trainer.max_steps == stage_file.trainer.max_steps
    assert cfg.optim.lr == stage_file.optim.lr
    cfg = compose(["stage=pretrain", "trainer.max_steps=7", "optim.lr=0.5", "experiment=demo"])
    assert cfg.trainer.max_steps == 7 and cfg.optim.lr == 0.5


def test_every_trainer_callback_and_logger_yaml_instantiates(tmp_path):
    """Every file we ship in callbacks/ and logger/ builds what Lightning takes there: a Callback, a Logger."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import Logger

    built = set()
    for group, kind in (("callbacks", Callback), ("logger", Logger)):
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            cfg = compose([f"run_dir={tmp_path}", f"{group}={path.stem}"])
            for name, node in cfg[group].items():
                target = hydra.utils.get_class(node._target_)
                try:
                    obj = hydra.utils.instantiate(node)
                except Exception as e:  # an extra that is not installed here must say which (wandb: the ref venv)
                    assert group == "logger" and name == "wandb" and "wandb" in str(e), (path, e)
                    continue
                assert isinstance(obj, target) and isinstance(obj, kind), f"{path}: {name} built {type(obj)}"
                built.add(f"{group}/{path.stem}.{name}")
    assert {"callbacks/default.checkpoint", "callbacks/early_stopping.early_stopping", "logger/default.csv"} <= built
    from minillm.accelerator import training_precision

    precision = training_precision(cfg.trainer.precision, cfg.trainer.accelerator)[0]  # `auto`, as build resolves it
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False, precision=precision)
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model=nope", "nope"),
        ("model.n_layr=3", "n_layr"),
        ("trainer.max_stpes=3", "max_stpes"),
        ("optim.lr=fast", "lr"),
        ("data.batch_size=many", "batch_size"),
        ("stage=nope", "nope"),
    ],
)
def test_typos_and_wrong_types_fail_at_compose_time(override, fragment):
    with pytest.raises(ConfigCompositionException, match=fragment):
        compose([override])


def test_invalid_values_fail_when_converted():
    with pytest.raises(ValueError, match="data.batch_size must be >= 1"):
        to_config(compose(["data.batch_size=0"]))


def test_the_whole_config_tree_is_in_the_repo():
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    assert {
        "model",
        "stage",
        "data",
        "tokenizer",
        "optim",
        "trainer",
        "callbacks",
        "logger",
        "experiment",
        "debug",
    } <= groups
    assert Path(CONF_DIR / "train.yaml").is_file()


def test_per_source_sampling_from_the_command_line():
    cfg = to_config(compose(["+data.sources.kjv.sample_ratio=0.5", "+data.sources.shakespeare={max_samples:3}"]))
    assert cfg.data.sources["kjv"].sample_ratio == 0.5 and cfg.data.sources["shakespeare"].max_samples == 3
    with pytest.raises(ValueError, match=r"data.sources.kjv: expected a mapping with keys"):
        to_config(compose(["+data.sources.kjv.sample_rate=0.5"]))
    with pytest.raises(ValueError, match=r"data.sources.kjv.sample_ratio must be in \[0, 1\]"):
        to_config(compose(["+data.sources.kjv.sample_ratio=2"]))


@pytest.mark.parametrize("option", ["ddp", "ddp_spawn"])
def test_strategy_presets_compose_and_instantiate_where_they_can(option):
    cfg = compose([f"trainer={option}"])
    assert cfg.trainer.strategy == option and cfg.trainer.max_steps == 2000  # the defaults come along
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False, precision="32-true")
    assert type(trainer.strategy).__name__.lower().startswith("ddp")


def test_the_fsdp_preset_wraps_each_transformer_block():
    from minillm.model import Block

    cfg = compose(["trainer=fsdp"])
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)  # Lightning runs FSDP on GPUs only: the strategy alone
    policy = strategy.kwargs["auto_wrap_policy"]  # torch's ModuleWrapPolicy over our Block
    assert type(strategy).__name__ == "FSDPStrategy" and policy._module_classes == {Block}
    assert strategy._state_dict_type == "full" and cfg.trainer.max_steps == 2000


def test_every_stage_declares_its_schema_data_kind_and_needs():
    import inspect

    from omegaconf import OmegaConf

    from minillm.data.kinds import KINDS
    from minillm.stages import MODULES, stage_module
    from minillm.train import build

    modules = {name: stage_module(name) for name in STAGES}
    assert set(modules.values()) == set(MODULES)  # every module is some stage's, once
    for name, stage in modules.items():
        assert stage.schema is STAGES[name], name
        assert OmegaConf.get_type(compose([f"stage={name}"]).stage) is stage.schema, name  # the YAML pulls it in
        assert KINDS[stage.data.name] is stage.data, name
    assert {s.data.name for s in modules.values()} == {"pretrain", "sft", "preference", "prompts"}
    assert run_names() == ["pretrain", "sft", "dpo", "reward", "rlhf", "rlhf-grpo"]  # the report's runs
    source = inspect.getsource(build)
    assert not any(f'"{name}"' in source for name in STAGES) and "hasattr" not in source  # generic wiring


def test_outputs_moves_every_run_dir_and_where_parents_are_found(tmp_path):
    from minillm.rundir import resolve_init

    cfg = to_config(compose(["stage=sft", f"outputs={tmp_path}/q"]))
    assert cfg.run_dir == f"{tmp_path}/q/sft_tiny"
    assert to_config(compose(["stage=rlhf", f"outputs={tmp_path}/q"])).run_dir == f"{tmp_path}/q/rlhf_tiny"
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/q/pretrain_tiny/final"):
        resolve_init("auto", "pretrain", "tiny", tmp_path / "q")
    (tmp_path / "q" / "pretrain_tiny" / "final").mkdir(parents=True)
    (tmp_path / "q" / "pretrain_tiny" / "final" / "minillm.json").write_text("{}")
    assert resolve_init("auto", "pretrain", "tiny", tmp_path / "q") == tmp_path / "q" / "pretrain_tiny" / "final"
