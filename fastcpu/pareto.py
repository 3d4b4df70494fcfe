"""The result of a study: its Pareto front as a table and a plot, and the best trial for a latency budget.

At the end of every study, and on demand for any stored study:

    python -m fastcpu.pareto --study squad [--storage sqlite:///sweeps/optuna.db] [--latency-budget-ms 30]

The front is Optuna's (`study.best_trials`): complete trials that meet every constraint and that no
other feasible trial beats on all objectives.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

REFERENCE_ATTR = "reference"  # study user attribute: {label: {metric: value}} of the uncompressed teacher
DETAILS = ("throughput", "speedup", "latency_p90_ms", "model_mb", "sparsity")  # shown beside the objectives
FILES = ("pareto.csv", "pareto.png", "pareto.html")
UNITS = {"throughput": "samples/s", "latency_p50_ms": "ms", "latency_p90_ms": "ms", "model_mb": "MiB"}


def is_feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())


def value(trial: FrozenTrial, name: str, metric_names: list[str]) -> float:
    """An objective from the trial's values, anything else from its user attributes."""
    if name in metric_names:
        return trial.values[metric_names.index(name)]
    return float(trial.user_attrs.get(name, math.nan))


@dataclass
class Report:
    study_name: str
    metric_names: list[str]
    directions: list[str]
    complete: list[FrozenTrial]
    front: list[FrozenTrial]
    n_failed: int
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency_budget_ms: float | None = None

    @classmethod
    def from_study(cls, study: optuna.Study, latency_budget_ms: float | None = None) -> Report:
        trials = study.get_trials(deepcopy=False)
        names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
        primary = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
        return cls(
            study_name=study.study_name,
            metric_names=list(names),
            directions=[d.name.lower() for d in study.directions],
            complete=[t for t in trials if t.state == TrialState.COMPLETE],
            front=sorted(study.best_trials, key=lambda t: (primary * t.values[0], t.number)),
            n_failed=sum(t.state == TrialState.FAIL for t in trials),
            references=study.user_attrs.get(REFERENCE_ATTR, {}),
            latency_budget_ms=latency_budget_ms,
        )

    # -- table ----------------------------------------------------------------------------------------
    @cached_property
    def param_names(self) -> list[str]:
        return sorted({name for t in self.complete for name in t.params})

    @cached_property
    def columns(self) -> list[str]:
        """The objectives, then the details the trials have (a study without references has no speedup)."""
        measured = {name for t in self.complete for name in t.user_attrs}
        details = [d for d in DETAILS if d in measured and d not in self.metric_names]
        return [*self.metric_names, *details]

    def row(self, trial: FrozenTrial) -> list[str]:
        settings = [_short(trial.params.get(name)) for name in self.param_names]
        return [
            str(trial.number),
            *settings,
            *(_short(value(trial, c, self.metric_names)) for c in self.columns),
        ]

    def table(self) -> str:
        header = ["trial", *self.param_names, *self.columns]
        rows = [header, *(self.row(t) for t in self.front)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def best(self) -> FrozenTrial | None:
        """The front trial best on the first objective whose p90 latency fits the budget."""
        fits = [
            t
            for t in self.front
            if self.latency_budget_ms is None
            or value(t, "latency_p90_ms", self.metric_names) <= self.latency_budget_ms
        ]
        return fits[0] if fits else None

    def text(self) -> str:
        infeasible = sum(not is_feasible(t) for t in self.complete)
        lines = [
            f"Pareto front of study {self.study_name!r}: {len(self.front)} of {len(self.complete)} complete "
            f"trial(s) ({infeasible} violate a constraint, {self.n_failed} failed); objectives: "
            + ", ".join(f"{n} ({d})" for n, d in zip(self.metric_names, self.directions, strict=True)),
            self.table() if self.front else "(no feasible complete trial yet)",
        ]
        for label, ref in self.references.items():
            lines.append(
                f"reference {label}: "
                + ", ".join(
                    f"{k} {_short(v)}" for k, v in ref.items() if k in (*self.columns, "backend_description")
                )
            )
        best = self.best()
        budget = (
            "" if self.latency_budget_ms is None else f" within p90 latency <= {self.latency_budget_ms:g} ms"
        )
        if best is None:
            lines.append(f"best trial{budget}: none")
        else:
            summary = ", ".join(f"{c} {_short(value(best, c, self.metric_names))}" for c in self.columns)
            lines.append(
                f"best trial{budget}: {best.number} ({summary}) -> {best.user_attrs.get('artifact')}"
            )
        return "\n".join(lines)

    def summary(self) -> dict[str, float]:
        """Figures for the study's MLflow parent run."""
        best = self.best()
        figures = {
            "n_complete": len(self.complete),
            "n_failed": self.n_failed,
            "n_pareto": len(self.front),
        }
        if best is not None:
            figures |= {f"best_{c}": value(best, c, self.metric_names) for c in self.columns}
            figures["best_trial"] = best.number
        return {k: float(v) for k, v in figures.items() if not math.isnan(float(v))}

    # -- files ----------------------------------------------------------------------------------------
    def write(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        self.write_csv(directory / "pareto.csv")
        if self.complete:
            figure = PlotData.of(self)
            figure.png(directory / "pareto.png")
            figure.html(directory / "pareto.html")
        return self.files(directory)

    @staticmethod
    def files(directory: Path) -> list[Path]:
        return [directory / name for name in FILES if (directory / name).exists()]

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["trial", "pareto", "feasible", *self.param_names, *self.columns, "artifact"])
            front = {t.number for t in self.front}
            for t in self.complete:
                writer.writerow(
                    [
                        t.number,
                        t.number in front,
                        is_feasible(t),
                        *(t.params.get(n) for n in self.param_names),
                        *(value(t, c, self.metric_names) for c in self.columns),
                        t.user_attrs.get("artifact"),
                    ]
                )


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _axis(name: str) -> str:
    return f"{name} ({UNITS[name]})" if name in UNITS else name


@dataclass
class PlotData:
    """Points of the Pareto plot: x is the second objective (or throughput), y the first."""

    x_name: str
    y_name: str
    points: list[tuple[float, float, str, bool, bool]]  # x, y, hover text, on the front, feasible
    references: dict[str, tuple[float, float]]
    title: str

    @classmethod
    def of(cls, report: Report) -> PlotData:
        names = report.metric_names
        y_name = names[0]
        x_name = names[1] if len(names) > 1 else "throughput"
        front = {t.number for t in report.front}
        points = [
            (
                value(t, x_name, names),
                value(t, y_name, names),
                f"trial {t.number}<br>" + "<br>".join(f"{k}={v}" for k, v in t.params.items()),
                t.number in front,
                is_feasible(t),
            )
            for t in report.complete
        ]
        references = {
            label: (float(ref[x_name]), float(ref[y_name]))
            for label, ref in report.references.items()
            if x_name in ref and y_name in ref
        }
        return cls(_axis(x_name), _axis(y_name), points, references, f"study {report.study_name!r}")

    def front_line(self) -> tuple[list[float], list[float]]:
        line = sorted((x, y) for x, y, _, on_front, _ in self.points if on_front)
        return [x for x, _ in line], [y for _, y in line]

    def png(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for feasible, style in ((True, dict(c="0.6", marker="o")), (False, dict(c="tab:red", marker="x"))):
            chosen = [(x, y) for x, y, _, on_front, ok in self.points if ok == feasible and not on_front]
            if chosen:
                label = "trial" if feasible else "trial violating a constraint"
                ax.scatter(*zip(*chosen, strict=True), label=label, s=30, **style)
        xs, ys = self.front_line()
        if xs:
            ax.plot(xs, ys, "-o", c="tab:blue", label="Pareto front", zorder=3)
        # the references often coincide (the same fp32 model on two backends): hollow markers stay visible
        for (label, (x, y)), (marker, size) in zip(
            self.references.items(), (("*", 260), ("D", 90)), strict=False
        ):
            ax.scatter(
                [x],
                [y],
                marker=marker,
                s=size,
                facecolors="none",
                edgecolors="k",
                label=f"{label} (reference)",
            )
        ax.set_xlabel(self.x_name)
        ax.set_ylabel(self.y_name)
        ax.set_title(self.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

    def html(self, path: Path) -> None:
        import plotly.graph_objects as go

        fig = go.Figure()
        for on_front, feasible, name, color in (
            (False, True, "trial", "gray"),
            (False, False, "trial violating a constraint", "red"),
            (True, True, "Pareto front", "royalblue"),
        ):
            chosen = [p for p in self.points if p[3] == on_front and p[4] == feasible]
            if chosen:
                xs, ys, texts = zip(*((x, y, t) for x, y, t, _, _ in sorted(chosen)), strict=True)
                mode = "lines+markers" if on_front else "markers"
                fig.add_trace(go.Scatter(x=xs, y=ys, text=texts, mode=mode, name=name, marker_color=color))
        for label, (x, y) in self.references.items():
            fig.add_trace(
                go.Scatter(x=[x], y=[y], mode="markers", name=f"{label} (reference)", marker_size=14)
            )
        fig.update_layout(title=self.title, xaxis_title=self.x_name, yaxis_title=self.y_name)
        fig.write_html(path, include_plotlyjs=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcpu.pareto", description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="study name (search.study_name)")
    parser.add_argument(
        "--storage", default=None, help="study storage URL; default sqlite:///sweeps/optuna.db"
    )
    parser.add_argument("--latency-budget-ms", type=float, default=None, help="name the best trial within it")
    parser.add_argument("--out", type=Path, default=None, help="where to write pareto.csv/png/html")
    args = parser.parse_args(argv)
    storage = args.storage or f"sqlite:///{Path('sweeps', 'optuna.db').resolve()}"
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
        return _fail(f"no study database at {storage.removeprefix('sqlite:///')}; pass --storage URL")
    try:
        study = optuna.load_study(study_name=args.study, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        return _fail(f"no study {args.study!r} in {storage}; studies there: {', '.join(names) or 'none'}")
    report = Report.from_study(study, args.latency_budget_ms)
    print(report.text())
    out = args.out or Path("outputs") / "pareto" / args.study
    for path in report.write(out):
        print(f"wrote {path}")
    print(json.dumps(report.summary()))
    return 0


def _fail(message: str) -> int:
    print(f"fastcpu.pareto: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
