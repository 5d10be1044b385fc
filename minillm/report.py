"""python -m minillm.report [model=tiny] [stages=[pretrain,sft,dpo,rlhf]] [eval.limit=100 ...]

The per-stage table `make demo` ends with: each stage's `outputs/<stage>_<model>/final` is evaluated (its
eval.json reused when newer than the weights) and the headline numbers — bits per byte, exact match on the
held-out verifiable family, preference accuracy on held-out pairs, mean reward (the `eval.reward` rule) and the
reward model's mean score of the same replies — go to `outputs/report.md` and a chart to `outputs/report.png`.
The reward model, when there is one (`outputs/reward_<model>/final`), also adds its pairwise accuracy per file.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from minillm.evaluation import EVAL_VERSION, EvalConfig, evaluate, headline, output_path
from minillm.generate import parse_cli
from minillm.rundir import final_dir

COLUMNS = ("bpb", "exact match", "preference accuracy", "mean reward", "reward-model score", "distinct-2")
UNIT_RANGE = ("exact match", "preference accuracy", "distinct-2")


def stage_result(folder: Path, config: EvalConfig) -> dict:
    """eval.json of a model folder, computed when missing, older than the weights or made with other settings."""
    out = output_path(folder, config)
    weights = folder / "model.safetensors"
    if out.is_file() and out.stat().st_mtime >= weights.stat().st_mtime:
        cached = json.loads(out.read_text(encoding="utf-8"))
        if cached.get("config") == asdict(config) and cached.get("eval_version") == EVAL_VERSION:
            return cached
    result = evaluate(folder, config)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def markdown(rows: dict[str, dict[str, float]], reward_model: dict | None) -> str:
    lines = ["| stage | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for stage, values in rows.items():
        cells = [f"{values[c]:.3f}" if c in values else "–" for c in COLUMNS]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if reward_model:
        text += (
            "\nReward model, held-out pairwise accuracy: "
            + ", ".join(f"{name} {v['accuracy']:.3f} ({v['n']} pairs)" for name, v in reward_model.items())
            + "\n"
        )
    return text


def chart(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in COLUMNS[:5] if any(c in v for v in rows.values())]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3), squeeze=False)
    for ax, column in zip(axes[0], columns):
        stages = [s for s, v in rows.items() if column in v]
        ax.bar(stages, [rows[s][column] for s in stages], color="#4c72b0")
        ax.set_title(column + (" (lower is better)" if column == "bpb" else ""), fontsize=9)
        if column in UNIT_RANGE:
            ax.set_ylim(0, 1)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    from omegaconf import OmegaConf

    values = parse_cli(argv)
    model = str(values.pop("model", "tiny"))
    stages = [str(s) for s in values.pop("stages", ["pretrain", "sft", "dpo", "rlhf"])]
    out_dir = Path(str(values.pop("out_dir", "outputs")))
    overrides = OmegaConf.from_dotlist([f"{k.removeprefix('eval.')}={v}" for k, v in values.items()])
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), overrides))
    reward_folder = final_dir("reward", model, out_dir)
    if config.reward_model is None and reward_folder.is_dir():  # score every stage's replies with it too
        config.reward_model = str(reward_folder)
    rows = {}
    for stage in stages:
        folder = final_dir(stage, model, out_dir)
        if (folder / "model.safetensors").is_file():
            rows[stage] = headline(stage_result(folder, config))
    if not rows:
        raise SystemExit(f"error: no final/ model under {out_dir}/<stage>_{model}/ for stages {stages}")
    reward = stage_result(reward_folder, config)["tasks"]["reward_model"] if reward_folder.is_dir() else None
    table = markdown(rows, reward)
    (out_dir / "report.md").write_text(f"# minillm report: model={model}\n\n{table}", encoding="utf-8")
    chart(rows, out_dir / "report.png")
    print(table + f"\nwrote {out_dir / 'report.md'} and {out_dir / 'report.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
