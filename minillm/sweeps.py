"""Hydra multiruns (`minillm train -m ...`, `minillm eval -m ...`): what each job did, and one table for the sweep.

Every job of a sweep writes `<job dir>/job.json` (its overrides, status, error, objective, wall time; `SweepJob`) when
it starts and when it ends, and rewrites the sweep's summary, so the summary is current while a sweep runs and after
a crash. A train job's dir is its run dir (logs/metrics.csv, final/eval.json).

    <sweep dir>/summary.csv   one row per job: overrides, status, best and final objective with their steps,
                              tokens/s, wall time, run dir, and the card's numbers where the job has an eval.json
    <sweep dir>/summary.md    the same, the swept overrides only, sorted by the objective (failed jobs last)
    <sweep dir>/summary.png   every job's validation curve in one chart (the `plots` extra)

Statuses: done, skipped (a rerun with resume=auto found it finished), failed (with the first line of its error),
interrupted (Ctrl-C, a kill, or a crash: a "running" job whose process is gone), running.

No torch here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback

from minillm.files import write_text_atomic

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
SUMMARY = "summary"  # summary.csv, summary.md, summary.png


def objective_direction(metric: str) -> str:
    """ "min" for losses, perplexities and bits per byte (`val/loss`, `val/ppl`, `bpb`); "max" for the rest
    (`val/reward`, `val/exact_match`)."""
    name = metric.rsplit("/", 1)[-1]
    return "min" if any(k in name for k in ("loss", "ppl", "bpb")) else "max"


def best_logged(metrics_csv: Path, metric: str) -> tuple[float, int] | None:
    """(best value, its step) of `metric` in a Lightning metrics.csv, by `objective_direction`; None if never
    logged."""
    points = logged(metrics_csv, metric)
    if not points:
        return None
    pick = min if objective_direction(metric) == "min" else max
    step, value = pick(points, key=lambda p: p[1])
    return value, step


def logged(metrics_csv: Path, metric: str) -> list[tuple[int, float]]:
    """[(step, value)] of `metric`, finite values only."""
    if not metrics_csv.is_file():
        return []
    points = []
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            value = row.get(metric)
            if value and math.isfinite(float(value)):
                points.append((int(row["step"]), float(value)))
    return points


@dataclass
class SweepJob:
    """One job's record, `<dir>/job.json`."""

    dir: Path
    num: int
    overrides: list[str]
    objective: str | None = None  # the train config's optimized_metric; None for eval jobs
    status: str = "running"
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    wall_s: float | None = None
    result: dict | None = None  # an eval job's headline numbers
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)

    @classmethod
    def start(cls, dir: Path, num: int, overrides: list[str], objective: str | None = None) -> SweepJob:
        job = cls(Path(dir), num, list(overrides), objective)
        job.write()
        return job

    def end(self, status: str, error: BaseException | str | None = None, result: dict | None = None) -> None:
        """Record how the job ended and rewrite the sweep's summary."""
        self.status, self.wall_s, self.result = status, round(time.time() - self.started_at, 1), result
        if error is not None:
            text = str(error).strip() or type(error).__name__
            self.error = text.removeprefix("error: ").splitlines()[0][:300]
        self.write()
        try:
            write_summary(self.dir.parent)
        except Exception as e:  # noqa: BLE001 (the job is done; its record is written; `minillm sweep` redoes this)
            log.warning("could not rewrite the summary of %s: %s", self.dir.parent, e)

    def write(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        record = {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}
        write_text_atomic(self.dir / JOB_FILE, json.dumps(record, indent=2, ensure_ascii=False))


def read_job(job_dir: Path) -> dict:
    record = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))
    if record["status"] == "running" and not _alive(record):
        record["status"] = "interrupted"  # its process is gone: killed or crashed
    return record


def _alive(record: dict) -> bool:
    if record.get("host") != socket.gethostname():
        return True  # another machine's job: take its word
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        pass
    return True


# ---- the summary ----

COLUMNS = ("job", "status", "error", "overrides", "best", "best_step", "final", "final_step", "tokens_per_s", "wall_s")


def job_row(job_dir: Path) -> dict:
    """One job's summary row from its files."""
    from minillm.config import headline

    record = read_job(job_dir)
    row = {
        "job": record["num"],
        "status": record["status"],
        "error": record.get("error") or "",
        "overrides": list(record["overrides"]),  # summary.csv: joined by spaces
        "wall_s": record.get("wall_s"),
        "run_dir": str(job_dir),
    }
    objective = record.get("objective")
    metrics = job_dir / "logs" / "metrics.csv"
    if objective:
        row["objective"] = objective
        best, curve = best_logged(metrics, objective), logged(metrics, objective)
        if best is not None:
            row["best"], row["best_step"] = best
            row["final_step"], row["final"] = curve[-1]
        speeds = [v for _, v in logged(metrics, "train/tokens_per_s")]
        if speeds:
            row["tokens_per_s"] = round(sorted(speeds)[len(speeds) // 2])  # the median: the first steps compile
    card = job_dir / "final" / "eval.json"
    result = record.get("result")
    if result is None and card.is_file():
        result = headline(json.loads(card.read_text(encoding="utf-8")))
    for name, value in (result or {}).items():
        row[name] = value
    return row


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in Path(sweep_dir).glob(f"*/{JOB_FILE}"))


def sorted_rows(rows: list[dict]) -> list[dict]:
    """By the objective (best first; jobs without one last, in job order); without an objective, in job order."""

    def key(row: dict):
        best = row.get("best")
        if best is None:
            return (1, 0.0, row["job"])
        sign = 1 if objective_direction(row.get("objective", "")) == "min" else -1
        return (0, sign * best, row["job"])

    return sorted(rows, key=key)


def overrides_of(row: dict) -> dict[str, str]:
    """{key: value} of a row's overrides."""
    return dict(o.split("=", 1) for o in row["overrides"] if "=" in o)


def swept(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(the overrides every job shares, the keys whose values differ between jobs)."""
    split = [overrides_of(row) for row in rows]
    shared = set.intersection(*(set(s.items()) for s in split)) if split else set()
    varying = sorted({k for s in split for k, v in s.items() if (k, v) not in shared})
    return sorted(f"{k}={v}" for k, v in shared), varying


def _cell(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def _short(value: str) -> str:
    """A sampled float (0.003918401745514829) with 4 significant digits; anything else as it is."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if len(value) <= 8 or number.is_integer() else f"{number:.4g}"


def markdown(rows: list[dict], sweep_dir: Path) -> str:
    shared, varying = swept(rows)
    extra = [k for row in rows for k in row if k not in (*COLUMNS, "run_dir", "objective")]
    card = list(dict.fromkeys(extra))
    objective = next((r["objective"] for r in rows if r.get("objective")), None)
    head = ["job", *varying, "status"]
    if objective:
        better = "lower" if objective_direction(objective) == "min" else "higher"
        head += [f"best {objective}", "step", f"final {objective}", "step", "tokens/s"]
    head += [*card, "wall s"]
    lines = [
        f"# Sweep {sweep_dir}",
        "",
        f"{len(rows)} jobs: "
        + ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in dict.fromkeys(r["status"] for r in rows))
        + (f". Sorted by the best {objective} ({better} is better)." if objective else "."),
        f"Every job: {' '.join(shared) or '(no shared overrides)'}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        values = overrides_of(row)
        error = row["error"] if len(row["error"]) <= 100 else row["error"][:99] + "…"  # whole in summary.csv
        status = row["status"] + (f": {error}" if error else "")
        cells = [row["job"], *(_short(values.get(k, "")) for k in varying), status]
        if objective:
            cells += [row.get("best"), row.get("best_step"), row.get("final"), row.get("final_step")]
            cells += [row.get("tokens_per_s")]
        cells += [*(row.get(k) for k in card), None if row.get("wall_s") is None else f"{row['wall_s']:.1f}"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict], out: Path) -> Path | None:
    """Each job's objective over steps, one line per job; None without matplotlib or without a curve."""
    from minillm.plots import have_matplotlib

    with_objective = [r for r in rows if r.get("objective")]
    curves = [(r, logged(Path(r["run_dir"]) / "logs" / "metrics.csv", r["objective"])) for r in with_objective]
    curves = [(r, c) for r, c in curves if c]
    if not curves or not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, varying = swept(rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    for row, curve in curves:
        values = overrides_of(row)
        label = f"{row['job']}: " + " ".join(f"{k}={_short(values.get(k, ''))}" for k in varying)
        ax.plot(*zip(*curve), "o-", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(curves[0][0]["objective"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_summary(sweep_dir: Path) -> tuple[list[dict], list[Path]]:
    """Rebuild summary.csv, summary.md (and summary.png) of a sweep from its jobs' files; returns (the sorted rows,
    the files written). Nothing is written for a folder without jobs."""
    sweep_dir = Path(sweep_dir)
    rows = sorted_rows([job_row(d) for d in job_dirs(sweep_dir)])
    if not rows:
        return rows, []
    names = list(dict.fromkeys([*COLUMNS, "objective", "run_dir", *(k for r in rows for k in r)]))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "overrides": " ".join(row["overrides"])} for row in rows)
    written = [sweep_dir / f"{SUMMARY}.csv", sweep_dir / f"{SUMMARY}.md"]
    write_text_atomic(written[0], table.getvalue())  # atomic: the jobs of a parallel launcher write them too
    write_text_atomic(written[1], markdown(rows, sweep_dir))
    png = plot_curves(rows, sweep_dir / f"{SUMMARY}.png")
    if png is not None:
        written.append(png)
    return rows, written


class SweepSummary(Callback):
    """Hydra callback (conf/train.yaml, conf/command.yaml `hydra.callbacks`): at the end of a multirun, print the
    summary table and where it is; exit 1 when a job failed (the other jobs have run)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        import sys

        sweep_dir = Path(config.hydra.sweep.dir)
        rows, written = write_summary(sweep_dir)
        if not rows:
            return
        print(markdown(rows, sweep_dir).split("\n", 2)[2], flush=True)
        print(f"wrote {', '.join(str(p) for p in written)}", flush=True)
        failed = [r for r in rows if r["status"] in ("failed", "interrupted")]
        if failed:
            jobs = ", ".join(f"{r['job']} ({r['status']})" for r in sorted(failed, key=lambda r: r["job"]))
            print(f"error: {len(failed)} of {len(rows)} jobs did not finish: {jobs}", file=sys.stderr)
            sys.exit(1)
