"""minillm report [model_name=tiny] [stages=[pretrain,sft,dpo,reward,rlhf]] [targets=demo|quality]
[grpo_family=verifiable] [out_dir=outputs] [card=outputs/report.md] [eval.limit=100 ...]

The report card `make demo` (and `make quality`) ends with: each stage's `outputs/<stage>_<model>/final` is
evaluated on held-out data (its eval.json reused when newer than the weights and made with the same settings)
and the card (`card`, default `<out_dir>/report.md`) shows, per stage, the metric that stage is for, with its
change from the stage it started from (read from the run's `training_config_snapshot.json`):

    pretrain   bits per byte on held-out pretraining text
    sft        exact match of greedy replies on the held-out verifiable family (and per task)
    dpo        reward accuracy on the held-out pairs of the families it trained on (the policy's log-prob gain
               over its reference ranks the chosen reply first: what DPO optimizes) and exact match, against the
               SFT model it started from
    reward     the reward model's pairwise accuracy on each held-out family it trained on
    rlhf       the reward its training optimized (the reward model's score, or the rule's) on held-out prompts,
               the KL to the model it started from, and the median reply length (rlhf-grpo: exact match, KL and
               length on the held-out questions of `grpo_family`, whatever eval.prompts says, against its start
               asked the same questions)

then every other column, the exact match per task, a table of DPO's and the reward model's accuracy on every
family of `eval.pairs` (those a stage trained on marked: the sources with training records in its run's
`dataset_stats.json`; the targets read only those), and a line saying which targets of the chosen set (conf/targets/)
are met. A chart goes beside it (`report.png`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from minillm.cli import Command
from minillm.config import EVAL_VERSION, EvalConfig, headline, output_path, run_names
from minillm.plots import PLOTS_HINT, have_matplotlib
from minillm.progress import phase, progress
from minillm.rundir import final_dir, stage_dir

GOLD = "reward-gold"  # <out_dir>/reward-gold_<model>: the gold reward model, trained apart, judging every reply
RUNS = tuple(r for run in run_names() for r in ([run, GOLD] if run == "reward" else [run]))  # in chain order
COLUMNS = (
    "bpb",
    "bpb ratio",  # to the pretrained model's: how much of the language model a stage kept (1 = all)
    "exact match",
    "preference accuracy",
    "reward accuracy",
    "mean reward",
    "reward-model score",
    "gold score",  # the replies under the gold reward model, which no stage trains against
    "KL",
    "median length",
    "degenerate",  # the share of replies repeating a token or bigram more than 3 times in a row
    "distinct-2",
)
UNIT_RANGE = ("exact match", "preference accuracy", "reward accuracy", "degenerate", "distinct-2")


@dataclass
class Targets:
    """What each stage must show on held-out data (conf/targets/<name>.yaml, `targets=<name>`)."""

    name: str = "demo"
    sft_gain: float = 0.30  # SFT exact match above its start's
    sft_min: float = 0.0  # SFT exact match at least this (0: no check)
    sft_task_min: float = 0.0  # every task's SFT exact match at least this (0: no check)
    dpo_reward_accuracy: float = 0.80  # pooled over the families DPO trained on
    reward_accuracy: float = 0.85  # on every family the reward model trained on
    rlhf_gain: float = 0.2  # PPO's reward-model score at least (1 + gain) x its start's
    rlhf_gold_gain: float = 0.0  # and its gold reward model's score at least (1 + gain) x its start's
    grpo_gain: float = 0.1  # GRPO's exact match above its start's
    kl_bound: float = 20.0  # nats per reply: RLHFMonitor's default alarm
    length_floor: float = 0.5  # the median reply may shrink to this share of its start's, not collapse
    bpb_ratio: float = 0.0  # every later stage's bpb at most this x the pretrained model's (the LM kept)
    degenerate: bool = False  # no degenerate reply after SFT, DPO and RLHF
    distinct_2: float = 0.0  # distinct-2 of those replies at least this
    # a rate (exact match, an accuracy) must clear its bar by this many binomial standard errors at the bar on its
    # held-out set, sqrt(bar (1 - bar) / n): a target met by noise is not met (`rate_check`)
    margin_se: float = 0.0


def targets_preset(name: str) -> Targets:
    """The targets of conf/targets/<name>.yaml, as `minillm report targets=<name>` reads them."""
    from minillm.config import compose

    return Targets(**compose([f"targets={name}"], config_name="report").targets)


def stage_result(folder: Path, config: EvalConfig, device: str = "cpu") -> dict:
    """eval.json of a model folder, computed (on `device`) when missing, older than the weights or made with other
    settings (torch is loaded only then)."""
    from minillm.evaluation import evaluate

    out = output_path(folder, config)
    weights = folder / "model.safetensors"
    if out.is_file() and out.stat().st_mtime >= weights.stat().st_mtime:
        cached = json.loads(out.read_text(encoding="utf-8"))
        if cached.get("config") == asdict(config) and cached.get("eval_version") == EVAL_VERSION:
            return cached
    result = evaluate(folder, config, device)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def parent_stage(stage: str, model: str, out_dir: Path) -> str | None:
    """The stage whose final/ this stage's run started from (its snapshot's init_from), if it is one of ours."""
    snapshot = stage_dir(stage, model, out_dir) / "training_config_snapshot.json"
    if not snapshot.is_file():
        return None
    init = (json.loads(snapshot.read_text(encoding="utf-8")).get("config") or {}).get("init_from")
    if not init:
        return None
    return next((s for s in RUNS if final_dir(s, model, out_dir).resolve() == Path(init).resolve()), None)


def trained_families(stage: str, model: str, out_dir: Path) -> set[str] | None:
    """The data files (by stem) a stage's run trained on: the sources with training records in its
    `dataset_stats.json`; None when the run dir has none (a model trained elsewhere: every family counts)."""
    stats = stage_dir(stage, model, out_dir) / "dataset_stats.json"
    if not stats.is_file():
        return None
    sources = json.loads(stats.read_text(encoding="utf-8")).get("sources", {})
    return {name for name, s in sources.items() if s.get("train_records", 0) > 0}


FamilyAccuracies = dict[str, tuple[float, int, bool]]  # pairs file -> (accuracy, pairs, trained on)
Families = dict[str, FamilyAccuracies]  # stage -> its `family_accuracies`


def family_accuracies(result: dict, trained: set[str] | None) -> FamilyAccuracies:
    """{pairs file: (accuracy, pairs, trained on)} of an eval.json: DPO's reward accuracy (gain over its
    reference) per `eval.pairs` file, or a reward model's pairwise accuracy."""
    tasks = result["tasks"]
    if "reward_model" in tasks:
        files, key = tasks["reward_model"], "accuracy"
    else:
        files, key = tasks.get("preference", {}).get("files", {}), "reward_accuracy"
    return {
        name: (v[key], v["n"], trained is None or name in trained) for name, v in files.items() if key in v and v["n"]
    }


def pooled(families: FamilyAccuracies) -> float | None:
    """The accuracy over all pairs of the families trained on (None when there are none)."""
    chosen = [(acc, n) for acc, n, trained in families.values() if trained]
    total = sum(n for _, n in chosen)
    return sum(acc * n for acc, n in chosen) / total if total else None


def rlhf_metric(stage: str, values: dict) -> str:
    """What an RLHF run optimized: GRPO against the verifiable rule, exact match; PPO, the reward model's score."""
    if stage == "rlhf-grpo":
        return "exact match"
    return "reward-model score" if "reward-model score" in values else "mean reward"


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def _delta(value: float, start: float) -> str:
    return f"{value - start:+.3f}"


def target_cell(stage: str, values: dict, parent: str | None, start: dict, families: Families | None = None) -> str:
    """The stage's own metric, with its change from the stage it started from."""
    vs = f" vs {parent}" if parent else ""
    if stage == "pretrain" and "bpb" in values:
        return f"bpb {_fmt(values['bpb'])}"
    if stage == "sft" and "exact match" in values:
        gain = f" ({_delta(values['exact match'], start['exact match'])}{vs})" if "exact match" in start else ""
        return f"exact match {_fmt(values['exact match'])}{gain}"
    if stage == "dpo" and "reward accuracy" in values:
        value, where = dpo_reward_accuracy(values, families)
        cell = f"reward accuracy {where}{_fmt(value)}{vs}"
        if "exact match" in values and "exact match" in start:
            cell += (
                f"; exact match {_fmt(values['exact match'])} ({_delta(values['exact match'], start['exact match'])})"
            )
        return cell
    if stage in ("reward", GOLD):
        accuracies = reward_families(values, families, stage)
        if accuracies:
            return f"pairwise accuracy ≥ {_fmt(min(accuracies.values()))} on {len(accuracies)} families"
    if stage.startswith("rlhf"):
        key = rlhf_metric(stage, values)
        if key in values:
            gain = f" ({_delta(values[key], start[key])}{vs})" if key in start else ""
            where = f" on {family}" if (family := start.get("family")) else ""
            cell = f"{key}{where} {_fmt(values[key])}{gain}"
            if "gold score" in values:
                was = f" ({_delta(values['gold score'], start['gold score'])})" if "gold score" in start else ""
                cell += f", gold score {_fmt(values['gold score'])}{was}"
            if "KL" in values:
                cell += f", KL {values['KL']:.2f}"
            if "median length" in values:
                was = f" ({parent} {start['median length']:.0f})" if "median length" in start else ""
                cell += f", median length {values['median length']:.0f}{was}"
            return cell
    return "–"


def reward_families(values: dict, families: Families | None = None, stage: str = "reward") -> dict[str, float]:
    """A reward model's pairwise accuracy per family it trained on (from its row: every family, when `families`
    does not say which it trained on)."""
    if families and stage in families:
        return {name: acc for name, (acc, _, trained) in families[stage].items() if trained}
    return {k.removeprefix("pairwise accuracy "): v for k, v in values.items() if k.startswith("pairwise")}


def dpo_reward_accuracy(values: dict, families: Families | None = None) -> tuple[float | None, str]:
    """DPO's reward accuracy the target reads: over the families it trained on when it left some out, else over
    all pairs (the row's pooled figure)."""
    got = (families or {}).get("dpo", {})
    if any(not trained for _, _, trained in got.values()) and (value := pooled(got)) is not None:
        return value, "on the families it trained on "
    return values.get("reward accuracy"), ""


def stage_starts(rows: dict[str, dict], parents: dict[str, str | None], starts: dict | None = None) -> dict:
    """Each stage's numbers to compare with: its parent's row, unless `starts` has the parent measured the stage's
    own way (GRPO's family)."""
    return {stage: (starts or {}).get(stage) or rows.get(parents.get(stage) or "", {}) for stage in rows}


def rate_check(what: str, value: float, need: float, n: int | None, margin_se: float) -> tuple[str, bool]:
    """A rate (exact match, an accuracy) against its bar. With `margin_se` and the held-out set's size `n`, it must
    clear the bar by margin_se binomial standard errors at the bar, sqrt(need (1 - need) / n) (a one-sided test
    that the true rate is above the bar); the card prints the margin."""
    if not margin_se or not n:
        return what, value >= need
    needed = margin_se * math.sqrt(max(need * (1 - need), 0.0) / n)
    return f"{what}, margin {value - need:+.3f} (needs {needed:.3f}: {margin_se:g} SE of {n})", value - need >= needed


def kept_exact_match(stage: str, values: dict, start: dict) -> tuple[str, bool]:
    """A preference or RL stage keeps the answers it started with: its exact match not below its start's."""
    value, was = values["exact match"], start["exact match"]
    return f"{stage} exact match {_fmt(value)} (≥ its start's {_fmt(was)})", value >= was


def targets_met(
    rows: dict[str, dict],
    parents: dict[str, str | None],
    targets: Targets,
    starts: dict | None = None,
    families: Families | None = None,
) -> list[tuple[str, bool]]:
    """(what was checked, met) for each target whose numbers the card has."""
    checks: list[tuple[str, bool]] = []
    start = stage_starts(rows, parents, starts)
    sft, dpo, k = rows.get("sft", {}), rows.get("dpo", {}), targets.margin_se
    if "exact match" in sft and "exact match" in start["sft"]:
        was, need = start["sft"]["exact match"], targets.sft_gain
        what = f"sft exact match {sft['exact match'] - was:+.3f} vs its start (≥ +{need:.2f})"
        checks.append(rate_check(what, sft["exact match"], was + need, sft.get("n exact match"), k))
    if "exact match" in sft and targets.sft_min:
        value, need = sft["exact match"], targets.sft_min
        checks.append(
            rate_check(f"sft exact match {_fmt(value)} (≥ {need:.2f})", value, need, sft.get("n exact match"), k)
        )
    per_task = {k.removeprefix("exact match "): v for k, v in sft.items() if k.startswith("exact match ")}
    if per_task and targets.sft_task_min:
        need = targets.sft_task_min
        for task, value in per_task.items():
            what = f"sft exact match on {task} {_fmt(value)} (≥ {need:.2f})"
            checks.append(rate_check(what, value, need, sft.get(f"n exact match {task}"), k))
    if "reward accuracy" in dpo:
        (value, what), need = dpo_reward_accuracy(dpo, families), targets.dpo_reward_accuracy
        n = sum(n for _, n, trained in (families or {}).get("dpo", {}).values() if trained) or None
        checks.append(rate_check(f"dpo reward accuracy {what}{_fmt(value)} (≥ {need:.2f})", value, need, n, k))
    if "exact match" in dpo and "exact match" in start["dpo"]:
        checks.append(kept_exact_match("dpo", dpo, start["dpo"]))
    family = reward_families(rows.get("reward", {}), families)
    sizes = {name: n for name, (_, n, _) in (families or {}).get("reward", {}).items()}
    for name, value in family.items():
        need = targets.reward_accuracy
        what = f"reward model on {name} {_fmt(value)} (≥ {need:.2f})"
        checks.append(rate_check(what, value, need, sizes.get(name), k))
    for stage in (s for s in rows if s.startswith("rlhf")):
        values, begin = rows[stage], start[stage]
        key = rlhf_metric(stage, values)
        if key == "exact match" and key in values and key in begin:
            need, where = begin[key] + targets.grpo_gain, f" on {begin['family']}" if "family" in begin else ""
            checks.append((f"{stage} exact match{where} {_fmt(values[key])} (≥ {_fmt(need)})", values[key] >= need))
        elif key in values and key in begin:
            need = begin[key] + targets.rlhf_gain * abs(begin[key])  # x(1 + gain) for a positive start
            what = f"{stage} {key} {_fmt(values[key])} (≥ {_fmt(need)}, from {_fmt(begin[key])})"
            checks.append((what, values[key] >= need))
            if targets.rlhf_gold_gain and "gold score" in values and "gold score" in begin:
                gold, was = values["gold score"], begin["gold score"]
                need = was + targets.rlhf_gold_gain * abs(was)
                what = f"{stage} gold reward-model score {_fmt(gold)} (≥ {_fmt(need)}, from {_fmt(was)})"
                checks.append((what, gold >= need))
            if "exact match" in values and "exact match" in begin:  # a learned reward's score, not bought with
                checks.append(kept_exact_match(stage, values, begin))  # wrong answers (reward hacking)
        if "KL" in values:
            kl = values["KL"]
            bound = targets.kl_bound
            checks.append((f"{stage} KL {kl:.2f} (finite, ≤ {bound:.0f})", kl == kl and abs(kl) <= bound))
        if "median length" in values and "median length" in begin:
            length, floor = values["median length"], targets.length_floor * begin["median length"]
            checks.append((f"{stage} median reply length {length:.0f} (≥ {floor:.0f})", length >= max(floor, 1)))
    for stage, values in ((s, v) for s, v in rows.items() if s != "pretrain"):  # what a later stage kept
        if targets.bpb_ratio and "bpb ratio" in values:
            ratio, bound = values["bpb ratio"], targets.bpb_ratio
            checks.append((f"{stage} bpb {ratio:.3f}x the pretrained model's (≤ {bound:.2f}x)", ratio <= bound))
        if targets.degenerate and "degenerate" in values:
            share = values["degenerate"]
            checks.append((f"{stage} degenerate replies {share:.3f} (none)", share == 0))
        if targets.distinct_2 and "distinct-2" in values:
            value, need = values["distinct-2"], targets.distinct_2
            checks.append((f"{stage} distinct-2 of its replies {_fmt(value)} (≥ {need:.2f})", value >= need))
    return checks


def add_bpb_ratios(rows: dict[str, dict]) -> None:
    """Each row's bpb over the pretrained model's ("bpb ratio"): what a later stage kept of the language model."""
    base = rows.get("pretrain", {}).get("bpb")
    for values in rows.values():
        if base and "bpb" in values:
            values["bpb ratio"] = values["bpb"] / base


def markdown(
    rows: dict[str, dict[str, float]],
    parents: dict[str, str | None],
    targets: Targets,
    starts: dict | None = None,
    grpo_family: str = "verifiable",
    families: Families | None = None,
) -> str:
    given, starts = starts, stage_starts(rows, parents, starts)
    columns = [c for c in COLUMNS if any(c in v for v in rows.values())]
    lines = ["| stage | its target | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for stage, values in rows.items():
        cells = [_fmt(values[c]) if c in values else "–" for c in columns]
        lines.append(
            f"| {stage} | {target_cell(stage, values, parents.get(stage), starts[stage], families)} | "
            + " | ".join(cells)
            + " |"
        )
    text = "\n".join(lines) + "\n"
    tasks = sorted({k.removeprefix("exact match ") for v in rows.values() for k in v if k.startswith("exact match ")})
    if tasks:
        other = grpo_family != "verifiable" and "rlhf-grpo" in rows
        family = f"; rlhf-grpo and the row under it: the {grpo_family} family" if other else ""
        text += f"\nExact match per task (held out{family}):\n\n| stage | " + " | ".join(tasks) + " |\n"
        text += "|---" * (len(tasks) + 1) + "|\n"
        for stage, values in rows.items():
            if any(f"exact match {t}" in values for t in tasks):
                cells = [_fmt(values[f"exact match {t}"]) if f"exact match {t}" in values else "–" for t in tasks]
                text += f"| {stage} | " + " | ".join(cells) + " |\n"
        grpo_start = (given or {}).get("rlhf-grpo")
        if other and grpo_start:
            cells = [_fmt(grpo_start[f"exact match {t}"]) if f"exact match {t}" in grpo_start else "–" for t in tasks]
            text += f"| {parents.get('rlhf-grpo')} on {grpo_family} | " + " | ".join(cells) + " |\n"
    text += family_table(rows, parents, families)
    checks = targets_met(rows, parents, targets, given, families)
    if checks:
        met = sum(ok for _, ok in checks)
        text += f"\nTargets ({targets.name}), {met} of {len(checks)} met:\n"
        text += "".join(f"- {what}: {'met' if ok else 'NOT met'}\n" for what, ok in checks)
    return text


def family_table(rows: dict[str, dict], parents: dict[str, str | None], families: Families | None) -> str:
    """DPO's reward accuracy and the reward model's pairwise accuracy on each held-out pairs family, a `*` on the
    families the stage trained on (what its targets read); from the reward model's row alone when `families` is
    not given."""
    families = dict(families or {})
    if "reward" not in families and (accuracies := reward_families(rows.get("reward", {}))):
        families["reward"] = {name: (acc, 0, True) for name, acc in accuracies.items()}
    stages = ("dpo", "reward", GOLD)
    names = list(dict.fromkeys(name for stage in stages for name in families.get(stage, {})))
    if not names:
        return ""
    what = {"dpo": f"reward accuracy vs {parents.get('dpo') or 'its start'}", "reward": "pairwise accuracy"}
    what[GOLD] = what["reward"]
    text = "\nPreference pairs per family (held out; * = the stage trained on it):\n\n"
    text += "| stage | metric | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 2) + "|\n"
    for stage in stages:
        if stage in families:
            got = families[stage]
            cells = [f"{_fmt(got[n][0])}{'*' if got[n][2] else ''}" if n in got else "–" for n in names]
            text += f"| {stage} | {what[stage]} | " + " | ".join(cells) + " |\n"
    return text


def chart(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in COLUMNS if c not in ("median length", "distinct-2") and any(c in v for v in rows.values())]
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


@dataclass
class ReportCommand:
    """`minillm report` (conf/report.yaml)."""

    model_name: str = "tiny"  # whose run dirs: <out_dir>/<stage>_<model_name> (`model` is train's preset group)
    stages: list[str] = field(default_factory=lambda: list(RUNS))
    targets: Targets = field(default_factory=Targets)  # conf/targets/<name>.yaml: targets=demo|quality
    grpo_family: str = "verifiable"  # eval/<family>.jsonl: the questions rlhf-grpo's exact match, KL and length use
    out_dir: str = "outputs"
    card: Optional[str] = None  # None: <out_dir>/report.md
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"  # where missing results are computed: auto = CUDA, then MPS, then the CPU (always fp32)


def run(command: ReportCommand) -> None:
    model, stages, targets, config = command.model_name, command.stages, command.targets, command.eval
    out_dir = Path(command.out_dir)
    card = Path(command.card) if command.card else out_dir / "report.md"
    reward_folder, gold_folder = final_dir("reward", model, out_dir), final_dir(GOLD, model, out_dir)
    if config.reward_model is None and reward_folder.is_dir():  # score every stage's replies with it too
        config.reward_model = str(reward_folder)
    if config.gold_reward_model is None and gold_folder.is_dir():  # and with the judge no stage trained against
        config.gold_reward_model = str(gold_folder)
    rows, parents, starts, families = {}, {}, {}, {}
    for stage in progress(stages, "report", unit="stage"):
        folder = final_dir(stage, model, out_dir)
        if not (folder / "model.safetensors").is_file():
            continue
        phase(f"report: evaluating {folder}")
        parents[stage] = parent_stage(stage, model, out_dir)
        stage_config = config
        if parents[stage] and (stage == "dpo" or stage.startswith("rlhf")):  # reward accuracy, KL: vs the start
            stage_config = replace(config, reference=str(final_dir(parents[stage], model, out_dir)))
        if stage == "rlhf-grpo":  # GRPO answers its family's questions for their rule: its KL and length there too
            stage_config = replace(stage_config, prompts=None, family=command.grpo_family)
            if parents[stage] and command.grpo_family != config.family:  # its start, asked the same questions
                start = final_dir(parents[stage], model, out_dir)
                out = start / f"eval_{command.grpo_family}.json"
                asked = replace(config, tasks=["verifiable", "reward"], family=command.grpo_family, prompts=None)
                asked = replace(asked, out=str(out))
                starts[stage] = {**headline(stage_result(start, asked, command.device)), "family": command.grpo_family}
        result = stage_result(folder, stage_config, command.device)
        rows[stage] = headline(result)
        if stage in ("dpo", "reward", GOLD):
            families[stage] = family_accuracies(result, trained_families(stage, model, out_dir))
    if not rows:
        raise SystemExit(f"error: no final/ model under {out_dir}/<stage>_{model}/ for stages {stages}")
    add_bpb_ratios(rows)
    table = markdown(rows, parents, targets, starts, command.grpo_family, families)
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(f"# minillm report: model={model}, {out_dir}/\n\n{table}", encoding="utf-8")
    if have_matplotlib():
        chart(rows, card.with_suffix(".png"))
        print(table + f"\nwrote {card} and {card.with_suffix('.png')}")
    else:
        print(table + f"\nwrote {card} (no chart: {PLOTS_HINT})")


COMMAND = Command("report", ReportCommand, run)
cli, main = COMMAND.cli, COMMAND.main  # main(argv): the same command from Python


if __name__ == "__main__":
    cli()
