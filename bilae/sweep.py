"""``bilae-sweep``: summarise a ``bilae-train -m`` sweep: a table of every job and a labelled Pareto plot.

    bilae-sweep multirun/2026-01-31/12-00-00

Reads each job's ``metrics.json`` and ``.hydra/overrides.yaml`` (:mod:`bilae.analysis.sweep`) and writes, in the
sweep directory, ``sweep.csv`` and ``sweep.md`` (one row per job, or per autoencoder of a job that trained several:
its swept values, final metrics and overrides) and ``sweep.html`` (val/mse against density, each point labelled by
its swept values, and the table; opens offline). When the jobs logged to W&B, the plot and the table also go to a
W&B run in the sweep's group (offline like the jobs unless ``--wandb online``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bilae.analysis.figures import pareto_figure
from bilae.analysis.sweep import labels, load_sweep, per_coder, sweep_page, sweep_table, to_csv, to_markdown
from bilae.autoencoders.checkpoint import atomic_write_text
from bilae.cli import reported
from bilae.console import quiet_console
from bilae.tracking import RUN_FILE

EXAMPLES = """\
examples:
  bilae-sweep multirun/2026-01-31/12-00-00                  # after bilae-train -m autoencoder.alpha=0,0.1,0.2
  bilae-sweep multirun/2026-01-31/12-00-00 --x train/density --y train/mse
  bilae-sweep multirun/2026-01-31/12-00-00 --out sweeps/alpha --wandb off
  bilae-sweep multirun/2026-01-31/12-00-00 --wandb online     # the summary run goes to wandb.ai now
  bilae-sweep outputs/2026-01-31                            # any directory: every metrics.json below it

outputs (in the sweep directory, or --out):
  sweep.csv, sweep.md   one row per job (per autoencoder of a job that trained several): swept values, final metrics,
                        overrides
  sweep.html            val/mse against density, each point labelled by its swept values, and the table (offline)
  wandb/                a W&B run in the sweep's group with the same plot and table, when the jobs used W&B
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bilae-sweep",
        description="Summarise a bilae-train -m sweep (bilinear autoencoders on LM activations): a table of every "
        "job's overrides and final metrics, and a Pareto plot of reconstruction against density.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "sweep", type=Path, help="the sweep directory (hydra.sweep.dir, e.g. multirun/<date>/<time>)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the files (default: the sweep directory)"
    )
    parser.add_argument(
        "--x", default="density", help="metric on the x axis (default: density, i.e. val/density)"
    )
    parser.add_argument("--y", default="mse", help="metric on the y axis (default: mse, i.e. val/mse)")
    parser.add_argument(
        "--wandb",
        choices=("auto", "off", "offline", "online"),
        default="auto",
        help="log the plot and table to W&B: auto (offline, when the jobs used W&B), off, offline or online",
    )
    return parser.parse_args(argv)


def summarise(sweep: Path, out: Path, x: str, y: str, wandb_mode: str = "auto") -> dict[str, Path]:
    """Write the table and the Pareto page of ``sweep`` into ``out``; returns what was written."""
    rows = per_coder(load_sweep(sweep))
    columns, values = sweep_table(rows)
    figure = pareto_figure(rows, x=x, y=y, labels=labels(rows)).update_layout(
        title=f"Sweep {sweep}: {y} vs {x}"
    )
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / "sweep.csv", "markdown": out / "sweep.md", "html": out / "sweep.html"}
    atomic_write_text(written["csv"], to_csv(columns, values))
    atomic_write_text(written["markdown"], to_markdown(columns, values))
    atomic_write_text(written["html"], sweep_page(f"bilae sweep {sweep}", figure, columns, values))
    identity = job_run(sweep)
    if wandb_mode != "off" and (identity or wandb_mode != "auto"):
        written["wandb"] = log_to_wandb(out, identity, figure, columns, values, wandb_mode)
    return written


def job_run(sweep: Path) -> dict[str, Any]:
    """The W&B identity (project, group) one of the sweep's jobs stored; empty when no job used W&B."""
    for path in sorted(sweep.rglob(RUN_FILE)):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return {}


def log_to_wandb(
    out: Path, identity: dict[str, Any], figure: Any, columns: list[str], values: list, mode: str
) -> Path:
    """Log the plot and the table to a W&B run in the sweep's group; returns the run's directory."""
    import wandb

    group = identity.get("group")
    run = wandb.init(
        project=identity.get("project") or "bilae",
        group=group,
        name=f"{group or out.name} summary",
        job_type="sweep-summary",
        dir=str(out),
        mode="online" if mode == "online" else "offline",
    )
    header: list[str | int] = list(columns)
    rows = [[" ".join(v) if isinstance(v, list) else v for v in row] for row in values]
    table = wandb.Table(columns=header, data=rows)
    run.log({"sweep/pareto": wandb.Plotly(figure), "sweep/table": table})
    where = Path(run.dir).parent
    run.finish()
    return where


def main(argv: list[str] | None = None) -> None:
    """Console script ``bilae-sweep``."""
    quiet_console()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with reported("bilae-sweep"):
        written = summarise(args.sweep, args.out or args.sweep, args.x, args.y, args.wandb)
        print((args.out or args.sweep).joinpath("sweep.md").read_text(), end="")
        print("\n".join(f"{kind + ':':<10}{path}" for kind, path in written.items()), flush=True)


if __name__ == "__main__":
    main()
