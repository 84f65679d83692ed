"""Line up training runs side by side: the parameters that differ, final losses and held-out metrics.

A run folder is what `actionft train` / notebook 04 writes (`outputs/<run_name>/`): `train_config.json`, and when
the run got that far `train_summary.json`, `trainer_state.json` (the logged losses), `accuracy.json` (notebook 05)
and `metrics.json` (notebook 06 or `actionft evaluate`). `actionft compare outputs/*` prints the table and saves one
plot of the loss curves; TensorBoard (`tensorboard --logdir outputs`) shows the same curves live.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from actionft.errors import ActionftError

# Keys that differ between any two runs without being a choice worth showing.
NOT_SETTINGS = {"run_name", "output_root", "resume_from_checkpoint"}


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ActionftError(f"{path}: cannot read it as JSON ({exc}); remove the file or rerun that step") from None


def load_run(folder: str | Path) -> dict[str, Any]:
    """A run folder's configuration, summary, logged losses and held-out results (absent parts are empty)."""
    folder = Path(folder)
    if not (folder / "train_config.json").is_file():
        raise ActionftError(f"{folder} is not a training run folder (no train_config.json); "
                            "give the folders that `actionft train` or notebook 04 wrote, e.g. outputs/<run_name>")
    optional = {name: _read(folder / f"{name}.json") if (folder / f"{name}.json").is_file() else {}
                for name in ("train_summary", "trainer_state", "accuracy", "metrics")}
    return {"name": folder.name, "folder": folder, "config": _read(folder / "train_config.json"), **optional}


def loss_curves(run: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) pairs of the training and validation losses the Trainer logged."""
    history = run["trainer_state"].get("log_history", [])
    return {key: [(h["step"], h[key]) for h in history if key in h and "step" in h] for key in ("loss", "eval_loss")}


def _short(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def compare_runs(folders: list[str | Path]):
    """A table (pandas DataFrame, one row per run): the settings that differ between the runs, then steps, losses
    and held-out metrics of the fine-tuned model. Returns (table, runs)."""
    import pandas as pd

    runs = [load_run(f) for f in folders]
    if not runs:
        raise ActionftError("no run folders given; e.g. actionft compare outputs/*")
    keys = sorted({k for r in runs for k in r["config"]} - NOT_SETTINGS)
    differing = [k for k in keys if len({json.dumps(r["config"].get(k), sort_keys=True) for r in runs}) > 1]
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run["name"]}
        row.update({k: _short(run["config"].get(k)) for k in differing})
        curves = loss_curves(run)
        row["steps"] = run["train_summary"].get("global_step")
        row["train_loss"] = run["train_summary"].get("train_loss")
        row["last_logged_loss"] = curves["loss"][-1][1] if curves["loss"] else None
        row["last_val_loss"] = curves["eval_loss"][-1][1] if curves["eval_loss"] else None
        if run["accuracy"]:
            row["base_top1_05"] = run["accuracy"].get("base")
            row["top1_05"] = run["accuracy"].get("finetuned")
        for name, value in run["metrics"].get("finetuned", {}).items():
            if isinstance(value, (int, float)):
                row[name] = value
        rows.append(row)
    table = pd.DataFrame(rows).set_index("run")
    return table.dropna(axis=1, how="all"), runs


def plot_losses(runs: list[dict[str, Any]], path: str | Path | None = None):
    """Training (solid) and validation (dashed) loss per optimizer step, one colour per run."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        curves = loss_curves(run)
        if curves["loss"]:
            ax.plot(*zip(*curves["loss"]), color=colour, label=f"{run['name']} train")
        if curves["eval_loss"]:
            ax.plot(*zip(*curves["eval_loss"]), color=colour, linestyle="--", marker="o", markersize=3,
                    label=f"{run['name']} val")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per supervised token")
    ax.set_title("training runs side by side")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def markdown(table) -> str:
    """The comparison as a markdown table (numbers rounded to 4 places)."""
    cols = list(table.columns)
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for run, row in table.iterrows():
        cells = [("" if v != v else f"{v:.4g}") if isinstance(v, float) else ("" if v is None else str(v))
                 for v in row.tolist()]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="line up training runs: differing parameters, losses, held-out metrics")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, e.g. outputs/*")
    p.add_argument("--plot", metavar="PNG", help="save the loss curves of all runs to this image")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    folders = [f for f in args.runs if Path(f).is_dir()]  # a shell glob over outputs/* also matches files
    table, runs = compare_runs(folders)
    print(markdown(table))
    if args.plot:
        plot_losses(runs, args.plot)
        print(f"loss curves: {args.plot}")
    return 0
