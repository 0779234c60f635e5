"""``tuneforge federated CONFIG.yaml [key=value ...]``: run a Flower federation on this machine."""

from __future__ import annotations


def add_federated_arguments(sub) -> None:
    sub.add_argument("config", help="YAML train config with a `federated:` section (see examples/federated_lora.yaml)")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. federated.rounds=3")
    sub.add_argument("--write-app", metavar="DIR", help="only write the Flower app directory (for `flwr run` on real "
                                                         "machines, docs/federated.md) and exit")


def run_federated_command(args) -> int:
    from rich.console import Console

    from tuneforge.federated.launch import run_federated

    console = Console()
    if args.write_app:
        from pathlib import Path

        from tuneforge.federated.launch import write_flower_app

        console.print(f"Flower app written to {write_flower_app(Path(args.write_app))}")
        return 0
    results = run_federated(args.config, list(args.overrides), say=console.print)
    console.print(results_table(results))
    return 0


def results_table(results: dict):
    """One row per round of ``federated_results.json``; round 0 is the global adapter before training."""
    from rich.table import Table

    table = Table(title=f"federated {results['method']}, {results['clients']} clients")
    for column in ("round", "global eval loss", "global exact match", "client eval loss (mean)", "clients averaged",
                   "failed", "rejected", "bytes up / client", "bytes down / client"):
        table.add_column(column)
    losses, accuracy = results["global_eval_loss"], results.get("global_exact_match", {})
    for round_key in sorted(set(results["rounds"]) | set(losses), key=int):  # round 0: before any training
        record = results["rounds"].get(round_key, {})
        up, down = record.get("up_bytes", {}), record.get("down_bytes", {})
        client_losses = [m["eval-loss"] for m in record.get("client_eval", {}).values()]
        table.add_row(round_key, _number(losses.get(round_key)), _number(accuracy.get(round_key)),
                      _number(sum(client_losses) / len(client_losses) if client_losses else None),
                      str(len(record.get("clients", {}))), str(len(record.get("failures", []))),
                      str(len(record.get("rejected", []))), _mean(up), _mean(down))
    table.caption = run_caption(results)
    return table


def run_caption(results: dict) -> str:
    """Totals under the table: bytes each client sent and received over the run, and the privacy spent."""
    records = results["rounds"].values()
    up = sum(sum(r.get("up_bytes", {}).values()) for r in records)
    down = sum(sum(r.get("down_bytes", {}).values()) for r in records)
    eval_traffic = sum(sum(r.get(k, {}).values()) for r in records for k in ("eval_up_bytes", "eval_down_bytes"))
    caption = f"run total: {up:,} bytes up, {down:,} bytes down for training (all clients)"
    if eval_traffic:
        caption += f", {eval_traffic:,} bytes for client evaluation"
    privacy = results.get("privacy")
    if privacy:
        epsilon = "no finite ε (no noise)" if privacy["epsilon"] is None else f"ε = {privacy['epsilon']:.2f}"
        caption += (f"; DP: clipping norm {privacy['clipping_norm']}, noise multiplier {privacy['noise_multiplier']}, "
                    f"{epsilon} at δ = {privacy['delta']:g} over {privacy['rounds']} round(s)")
    return caption


def _mean(per_client: dict) -> str:
    return f"{sum(per_client.values()) / len(per_client):,.0f}" if per_client else "-"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"
