"""Federated finetuning (issue 21's Measure): accuracy against rounds per method, beside centralized
training with the same total steps, and the bytes each client sends and receives per round.

Setup: ``examples/federated_lora.yaml`` — 4 clients, a Dirichlet (α = 0.5) split over two bundled tasks
(``arithmetic``, ``state_tracking``), SmolLM2-135M, 10 steps per client per round. Every row is a real
``tuneforge federated`` run (SuperLink + SuperNodes on loopback, ``tuneforge.federated.launch``):

- ``fedavg``       FedAvg of LoRA (r = 8 on q/v)
- ``ffa-lora``     LoRA with A frozen and shared (``lora-fa``), B averaged
- ``compeft``      FedAvg of LoRA, uploads as ComPEFT sparse ternary at ``--density`` (default 0.1)
- ``slora``        ``--slora-sparse-rounds`` rounds of a 1% sparse warm-up, then SVD-initialised LoRA
- ``fedkseed``     MeZO full finetuning on K = 4096 shared seeds (lr ``--zo-lr``)
- ``central``      one client holding the union, ``clients × steps`` steps per round (LoRA, as fedavg)
- ``central-zo``   the same for MeZO full finetuning: fedkseed's centralized reference

Accuracy is the server's greedy exact match on the union of the clients' eval data after each round
(``federated.accuracy_examples``). Bytes are the serialised Flower message contents
(``federated_results.json``: ``up_bytes`` / ``down_bytes`` per client per round).

    python bench/federated.py                                    # the real measurement (see docs/federated.md)
    python bench/federated.py --model tiny --clients 2 --rounds 2 --steps 2 --eval-examples 4 --data-size 40 \
        --output-dir /tmp/bench_federated_smoke                  # smoke test
    python bench/federated.py --report-only                      # rebuild the report from the JSONL

Resumable: each finished row is a JSON line in ``<output-dir>/federated.jsonl`` keyed by its settings; a
rerun skips finished rows. Writes ``federated.md`` and ``federated.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import yaml

ROWS = ("central", "fedavg", "ffa-lora", "compeft", "slora", "central-zo", "fedkseed")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "federated_lora.yaml"
RESULTS = "federated.jsonl"
BASELINE = {"fedavg": "central", "ffa-lora": "central", "compeft": "central", "slora": "central",
            "fedkseed": "central-zo"}


def row_config(row: str, args: argparse.Namespace, port: int) -> dict:
    """The federated config of one row: the example config with this row's method and the run's sizes."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["model"] = args.model_path or raw["model"]
    raw["output_dir"] = str(Path(args.output_dir) / row)
    raw["device"] = args.device
    raw["training"]["max_steps"] = args.steps
    raw["data"]["eval_size"] = args.eval_examples
    if args.data_size:
        raw["data"]["options"] = {"size": args.data_size}
    fed = raw["federated"]
    fed.update(clients=args.clients, rounds=args.rounds, port=port, accuracy_examples=args.eval_examples,
               alpha=args.alpha)
    if row.startswith("central"):  # one client holding everything, the clients' steps folded into its own
        fed.update(clients=1, partition="iid")
        raw["training"]["max_steps"] = args.steps * args.clients
        raw["data"]["eval_size"] = args.eval_examples * args.clients  # the same union eval set as the federated rows
    if row == "ffa-lora":
        raw["adapter"]["method"] = "lora-fa"
        fed["method"] = "ffa-lora"
    elif row == "compeft":
        fed["compress_density"] = args.density
    elif row == "slora":
        # at least one LoRA round after the warm-up, also in short smoke runs
        fed.update(method="slora", slora_sparse_rounds=min(args.slora_sparse_rounds, args.rounds - 1),
                   slora_density=0.01)
    elif row in ("fedkseed", "central-zo"):
        raw["adapter"] = {"method": "full"}
        raw["update_rule"] = {"method": "mezo", "eps": 1e-3}
        raw["training"].update(lr=args.zo_lr, weight_decay=0.0)
        fed.update(method="fedkseed", seeds=4096)
    return raw


def row_key(row: str, args: argparse.Namespace) -> str:
    settings = {k: getattr(args, k) for k in ("model", "clients", "rounds", "steps", "eval_examples", "data_size", "alpha",
                                              "density", "slora_sparse_rounds", "zo_lr", "device")}
    return json.dumps({"row": row, **settings}, sort_keys=True)


def run_row(row: str, args: argparse.Namespace, port: int) -> dict:
    from tuneforge.federated.launch import run_federated

    raw = row_config(row, args, port)
    path = Path(args.output_dir) / f"{row}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    start = time.perf_counter()
    results = run_federated(path, say=lambda line: print(f"[{row}] {line}", flush=True))
    return {"key": row_key(row, args), "row": row, "seconds": time.perf_counter() - start, "results": results}


def summarise(record: dict) -> dict:
    """Accuracy per round and mean bytes per client-round (training messages) of one row."""
    results = record["results"]
    rounds = results["rounds"].values()
    up = [b for r in rounds for b in r.get("up_bytes", {}).values()]
    down = [b for r in rounds for b in r.get("down_bytes", {}).values()]
    accuracy = {int(k): v for k, v in results.get("global_exact_match", {}).items()}
    loss = {int(k): v for k, v in results.get("global_eval_loss", {}).items()}
    return {"row": record["row"], "accuracy": accuracy, "loss": loss, "seconds": record["seconds"],
            "up_per_client_round": sum(up) / len(up) if up else None,
            "down_per_client_round": sum(down) / len(down) if down else None}


def report(records: list[dict], output_dir: Path) -> str:
    rows = {summary["row"]: summary for summary in map(summarise, records)}
    lines = ["| method | final exact match | of centralized | final eval loss | bytes up / client-round "
             "| bytes down / client-round | wall time (s) |", "|---|---|---|---|---|---|---|"]
    for name in ROWS:
        if name not in rows:
            continue
        summary = rows[name]
        last = max(summary["accuracy"], default=None)
        final = summary["accuracy"].get(last) if last is not None else None
        baseline = rows.get(BASELINE.get(name, ""), {}).get("accuracy", {})
        reference = baseline.get(max(baseline, default=-1))
        ratio = f"{final / reference:.0%}" if final is not None and reference else "-"
        final_loss = summary["loss"].get(max(summary["loss"], default=-1))
        lines.append(f"| {name} | {_fmt(final)} | {ratio} | {_fmt(final_loss)} | {_bytes(summary['up_per_client_round'])} "
                     f"| {_bytes(summary['down_per_client_round'])} | {summary['seconds']:.0f} |")
    lines += ["", "Exact match after each round (round 0: before training):", "",
              "| method | " + " | ".join(str(r) for r in _all_rounds(rows)) + " |",
              "|---|" + "---|" * len(_all_rounds(rows))]
    for name, summary in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(summary["accuracy"].get(r)) for r in _all_rounds(rows)) + " |")
    text = "\n".join(lines) + "\n"
    (output_dir / "federated.md").write_text(text)
    _plot(rows, output_dir / "federated.png")
    return text


def _all_rounds(rows: dict) -> list[int]:
    return sorted({r for summary in rows.values() for r in summary["accuracy"]})


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _bytes(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _plot(rows: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, summary in rows.items():
        rounds = sorted(summary["accuracy"])
        axis.plot(rounds, [summary["accuracy"][r] for r in rounds], marker="o", label=name,
                  linestyle="--" if name.startswith("central") else "-")
    axis.set_xlabel("round")
    axis.set_ylabel("exact match (union eval)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def load_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model name or path; 'tiny' builds a tiny random model")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per client per round")
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--data-size", type=int, help="examples per task (default: the example config's)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration over the two tasks")
    parser.add_argument("--density", type=float, default=0.1, help="ComPEFT density of the compeft row")
    parser.add_argument("--slora-sparse-rounds", type=int, default=2)
    parser.add_argument("--zo-lr", type=float, default=1e-6, help="learning rate of the MeZO rows")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--port", type=int, default=19700, help="first loopback port; each row takes the next ten")
    parser.add_argument("--output-dir", default="runs/bench_federated")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    args.model_path = _tiny_model(Path(args.output_dir)) if args.model == "tiny" else args.model
    return args


def _tiny_model(output_dir: Path) -> str:
    """A tiny random Llama with the tests' tokenizer, saved once: for smoke tests only."""
    directory = output_dir / "tiny_model"
    if not (directory / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_models import tiny_chat_model_and_tokenizer

        model, tokenizer = tiny_chat_model_and_tokenizer()
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return str(directory)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    jsonl = output_dir / RESULTS
    records = load_records(jsonl)
    if not args.report_only:
        done = {record["key"] for record in records}
        for index, row in enumerate(args.rows):
            if row_key(row, args) in done:
                print(f"[{row}] already measured, skipped")
                continue
            record = run_row(row, args, args.port + 10 * index)
            with jsonl.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            records.append(record)
    wanted = {row_key(row, args) for row in args.rows}
    print(report([r for r in records if r["key"] in wanted], output_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
