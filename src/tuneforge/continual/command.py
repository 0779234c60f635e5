"""``tuneforge continual CONFIG.yaml [key=value ...] [--resume | --overwrite]``: run a task stream."""

from __future__ import annotations


def add_continual_arguments(sub) -> None:
    sub.add_argument("config", nargs="?", help="YAML continual config (see examples/continual_*.yaml and docs/continual.md)")
    sub.add_argument("overrides", nargs="*", metavar="key=value",
                     help="dotted overrides, e.g. method.name=replay train.training.max_steps=20")
    sub.add_argument("--resume", action="store_true", help="continue the stream in output_dir: finished tasks are "
                     "kept, the task in progress continues from its last checkpoint")
    sub.add_argument("--overwrite", action="store_true", help="replace an earlier stream in output_dir")
    sub.add_argument("--list", action="store_true", help="list the continual methods and bundled streams, then exit")


def run_continual_command(args) -> int:
    from rich.console import Console

    from tuneforge.continual.methods import continual_methods
    from tuneforge.continual.streams import STREAMS

    console = Console()
    if args.list:
        for name, description in continual_methods().items():
            console.print(f"method {name}: {description}", highlight=False)
        for name, tasks in STREAMS.items():
            console.print(f"stream {name}: {' -> '.join(tasks)}", highlight=False)
        return 0
    if args.config is None:
        from tuneforge.errors import ConfigError

        raise ConfigError("tuneforge continual needs a config file (see examples/continual_smollm2.yaml), or --list")
    from tuneforge.config import apply_overrides, load_config_file
    from tuneforge.continual.runner import run_continual

    raw = apply_overrides(load_config_file(args.config), list(args.overrides))
    report = run_continual(raw, source=args.config, resume=args.resume, overwrite=args.overwrite,
                           say=lambda text: console.print(text, highlight=False))
    console.print(summary_table(report))
    return 0


def summary_table(report: dict):
    from rich.table import Table

    table = Table(title=f"R[i][j], exact match % ({report['method']})")
    table.add_column("after")
    for task in report["tasks"]:
        table.add_column(task)
    if report["baseline_accuracy"] is not None:
        table.add_row("base", *(f"{100 * value:.1f}" for value in report["baseline_accuracy"]))
    for members, row in zip(report["stages"], report["R"]):
        table.add_row("+".join(report["tasks"][t] for t in members), *(f"{100 * value:.1f}" for value in row))
    metrics = report.get("metrics", {})
    table.caption = "  ".join(f"{key} {100 * value:+.1f}" if key != "average_accuracy" else f"{key} {100 * value:.1f}"
                              for key, value in metrics.items())
    if report["probe"].get("drift") is not None:
        table.caption += f"  probe loss drift {report['probe']['drift']:+.4f} ({report['probe']['name']})"
    return table
