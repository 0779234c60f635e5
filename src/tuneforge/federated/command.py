"""``tuneforge federated CONFIG.yaml [key=value ...]``: run a Flower federation on this machine."""

from __future__ import annotations


def add_federated_arguments(sub) -> None:
    sub.add_argument("config", help="YAML train config with a `federated:` section (see examples/federated_lora.yaml)")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. federated.rounds=3")
    sub.add_argument("--write-app", metavar="DIR", help="only write the Flower app directory (for `flwr run` on real "
                                                         "machines, docs/federated.md) and exit")


def run_federated_command(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tuneforge.federated.launch import run_federated

    console = Console()
    if args.write_app:
        from pathlib import Path

        from tuneforge.federated.launch import write_flower_app

        console.print(f"Flower app written to {write_flower_app(Path(args.write_app))}")
        return 0
    results = run_federated(args.config, list(args.overrides), say=console.print)
    table = Table(title=f"federated {results['method']}, {results['clients']} clients")
    for column in ("round", "global eval loss", "client eval loss (mean)", "clients averaged", "failed", "rejected", "bytes up / client",
                   "bytes down / client"):
        table.add_column(column)
    for round_key, record in sorted(results["rounds"].items(), key=lambda item: int(item[0])):
        up, down = record.get("up_bytes", {}), record.get("down_bytes", {})
        client_losses = [m["eval-loss"] for m in record.get("client_eval", {}).values()]
        table.add_row(round_key, f"{results['global_eval_loss'].get(round_key, float('nan')):.4f}",
                      f"{sum(client_losses) / len(client_losses):.4f}" if client_losses else "-",
                      str(len(record.get("clients", {}))), str(len(record.get("failures", []))),
                      str(len(record.get("rejected", []))), _mean(up), _mean(down))
    console.print(table)
    return 0


def _mean(per_client: dict) -> str:
    return f"{sum(per_client.values()) / len(per_client):,.0f}" if per_client else "-"
