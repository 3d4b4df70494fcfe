"""Accuracy of compressed students measured on their runtime artifacts, recipe x sparsity x depth.

    python benchmarks/accuracy.py --task {sst2,squad} --data DIR_OR_FILE [--recipe NAME ...]
        [--sparsity S ...] [--layers N ...] [--json PATH] [-- key=value ...]

The teacher is fine-tuned once on the full training data (cached under teacher.cache_dir, as every trial
does); each row then runs one trial of `+experiment=TASK recipe=NAME pruning.sparsity=S` with a student
of N layers, and is scored on the artifact deployed on the backend `auto` picks. SQuAD data is the
official dev file split by article (../shared/data/squad/SPLIT.md: articles i % 4 == 3 evaluate), or,
in a directory that also has train-v1.1.json, the official protocol. SST-2 data is a directory with
train.tsv and dev.tsv. Overrides after `--` apply to every row (e.g. task.holdout_offset=1).

Every row is added to docs/accuracy.json (a row measured again replaces the old one) and the table in
docs/accuracy.md is written anew from it (--doc PATH: another markdown file, its records beside it);
--json PATH also writes this run's rows alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: `python benchmarks/accuracy.py`

from fastcpu.__main__ import CONFIG_DIR, quiet_library_noise, user_errors  # noqa: E402

DOC = ROOT / "docs" / "accuracy.md"
TABLE_START, TABLE_END = "<!-- accuracy table: written by benchmarks/accuracy.py -->", "<!-- end of table -->"
KEY = ("task", "recipe", "sparsity", "layers", "overrides")


def recipes() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "recipe").glob("*.yaml"))


def data_overrides(task: str, data: Path) -> list[str]:
    """The task's data overrides for a file or directory, or a SystemExit naming what is missing."""
    if task == "sst2":
        train, dev = data / "train.tsv", data / "dev.tsv"
        if not (train.is_file() and dev.is_file()):
            raise SystemExit(f"--data {data}: SST-2 needs a directory with train.tsv and dev.tsv")
        return [f"task.train_file={train}", f"task.eval_file={dev}", "task.max_train_samples=null"]
    dev = data / "dev-v1.1.json" if data.is_dir() else data
    if not dev.is_file():
        raise SystemExit(f"--data {data}: SQuAD needs dev-v1.1.json (a file, or a directory holding it)")
    base = ["task=squad", "task.dataset=null", "task.max_train_samples=null", "task.max_eval_samples=null"]
    train = data / "train-v1.1.json" if data.is_dir() else None
    if train is not None and train.is_file():
        return [*base, f"task.train_file={train}", f"task.eval_file={dev}"]
    return [
        *base,
        f"task.train_file={dev}",
        f"task.eval_file={dev}",
        "task.holdout_every=4",
        "task.holdout_offset=3",
    ]


def kept_layers(n: int, teacher_layers: int) -> list[int] | None:
    """n teacher layers spread evenly and ending on the last (the ones TinyBERT's uniform map pairs)."""
    if n == teacher_layers:
        return None
    return [round((m + 1) * teacher_layers / n) - 1 for m in range(n)]


def record(task: str, recipe: str, sparsity: float, layers: int, overrides: list[str], result: dict) -> dict:
    metric = "f1" if task == "squad" else "accuracy"
    return {
        "task": task,
        "recipe": recipe,
        "sparsity": sparsity,
        "layers": layers,
        "overrides": overrides,
        "metric": metric,
        "teacher_score": result[f"teacher_{metric}"],
        "student_score": result[metric],
        "relative_drop": result["relative_drop"],
        "train_seconds": result["train_seconds"],
        "train_steps": result["train_steps"],
        "throughput": result["throughput"],
        "backend": result["backend_description"],
        "block_sparsity": result["sparsity"],
        "measured": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "artifact": shown_path(Path(result["artifact"])),
    }


def shown_path(path: Path) -> str:
    """The path relative to the checkout when inside it, so the committed records name no machine."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def merge(records: Path, rows: list[dict]) -> list[dict]:
    """The records file with `rows` added, replacing rows of the same key."""
    stored = json.loads(records.read_text()) if records.exists() else []
    keys = {tuple(json.dumps(row[k]) for k in KEY) for row in rows}
    kept = [row for row in stored if tuple(json.dumps(row[k]) for k in KEY) not in keys]
    merged = sorted(kept + rows, key=lambda r: (r["task"], r["layers"], r["sparsity"], r["recipe"]))
    records.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def table(rows: list[dict]) -> str:
    lines = [
        "| task | layers | sparsity (4x1) | recipe | overrides | teacher | student | relative drop | train | "
        "throughput (samples/s) | backend | measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        backend = r["backend"].split(":")[0]
        lines.append(
            f"| {r['task']} | {r['layers']} | {r['sparsity']:.0%} | {r['recipe']} "
            f"| {' '.join(r['overrides'])} "
            f"| {r['teacher_score']:.2f} | {r['student_score']:.2f} | {r['relative_drop']:.1%} "
            f"| {r['train_seconds'] / 60:.0f} min | {r['throughput']:.1f} | {backend} | {r['measured']} |"
        )
    return "\n".join(lines)


def write_doc(doc: Path, rows: list[dict]) -> None:
    text = doc.read_text() if doc.exists() else f"# Accuracy\n\n{TABLE_START}\n{TABLE_END}\n"
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    doc.write_text(f"{head}{TABLE_START}\n{table(rows)}\n{TABLE_END}{tail}")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    ours, overrides = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=["sst2", "squad"])
    parser.add_argument(
        "--data", required=True, type=Path, help="SQuAD dev file or directory; SST-2 directory"
    )
    parser.add_argument(
        "--recipe", nargs="+", default=["default"], help=f"from conf/recipe: {', '.join(recipes())}"
    )
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.8])
    parser.add_argument("--layers", nargs="+", type=int, default=[6])
    parser.add_argument("--json", type=Path, help="also write this run's rows here")
    parser.add_argument(
        "--doc", type=Path, default=DOC, help="the markdown table to rewrite (default: %(default)s)"
    )
    parser.add_argument(
        "--outputs", type=Path, default=ROOT / "outputs" / "accuracy", help="trial directories"
    )
    args = parser.parse_args(ours)
    unknown = sorted(set(args.recipe) - set(recipes()))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; allowed: {', '.join(recipes())}")
    bad = [s for s in args.sparsity if not 0 <= s < 1]
    if bad:
        parser.error(f"--sparsity {bad}: allowed [0, 1)")
    if any(n < 1 for n in args.layers):
        parser.error("--layers must be >= 1")
    return args, overrides


def main(argv: list[str]) -> None:
    args, overrides = parse(argv)
    import hydra
    import torch

    from fastcpu.teacher import Teachers, load_model_config, resolve_source
    from fastcpu.trial import TrialConfig, check_against_teacher, run_trial

    quiet_library_noise()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base = [f"+experiment={args.task}", "~search", "tracking=off", *data_overrides(args.task, args.data)]
    teachers, rows = Teachers(), []
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        plan = []
        for recipe in args.recipe:
            for layers in args.layers:
                for sparsity in args.sparsity:
                    trial = [*base, f"recipe={recipe}", f"pruning.sparsity={sparsity}", *overrides]
                    cfg = hydra.compose(config_name="config", overrides=trial)
                    teacher_config = load_model_config(resolve_source(cfg.teacher.model))
                    teacher_layers = teacher_config.num_hidden_layers
                    if layers > teacher_layers:
                        raise SystemExit(f"--layers {layers}: the teacher has {teacher_layers} layers")
                    kept = json.dumps(kept_layers(layers, teacher_layers)).replace(" ", "")
                    cfg = hydra.compose(config_name="config", overrides=[*trial, f"student.layers={kept}"])
                    # every row's config is valid, also against the teacher's, before the first trains
                    check_against_teacher(TrialConfig.from_hydra(cfg), teacher_config)
                    plan.append((recipe, layers, sparsity, cfg))
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        for recipe, layers, sparsity, cfg in plan:
            torch._dynamo.reset()
            out = args.outputs / args.task / f"{stamp}_{recipe}_s{sparsity:g}_l{layers}"
            result = run_trial(cfg, out, teachers=teachers)
            rows.append(record(args.task, recipe, sparsity, layers, overrides, result))
            merged = merge(args.doc.with_suffix(".json"), [rows[-1]])
            write_doc(args.doc, merged)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1) + "\n")
            print(table([rows[-1]]).splitlines()[-1], flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except user_errors() as error:
        sys.exit(f"accuracy: error: {error}")
