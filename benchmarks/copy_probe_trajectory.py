"""The copy probe over one ``medvae train-prior`` run: held-out diffusion loss and near-copies per validation.

    python benchmarks/copy_probe_trajectory.py --run RUN_FOLDER [--json out.json]

Reads the run's metrics.jsonl (``val/diffusion_loss``, ``val/copy_flagged_fraction``,
``val/copy_nearest_distance``, ``val/copy_threshold``) and events.jsonl (``copy_risk``), prints a
table and writes JSON. The run itself is a plain train-prior with ``train.val_every`` set; the
command that made it goes in benchmarks/RESULTS.md beside the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def trajectory(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = [{"step": r["step"], "val_diffusion_loss": r.get("val/diffusion_loss"),
               "flagged_fraction": r["val/copy_flagged_fraction"], "nearest_distance": r["val/copy_nearest_distance"],
               "threshold": r["val/copy_threshold"]} for r in rows if "val/copy_flagged_fraction" in r]
    events_file = run / "events.jsonl"
    events = [json.loads(line) for line in events_file.read_text().splitlines()] if events_file.is_file() else []
    losses = [p for p in probes if p["val_diffusion_loss"] is not None]
    return {"run": str(run), "probes": probes, "copy_risk_events": [e for e in events if e["kind"] == "copy_risk"],
            "other_events": [e for e in events if e["kind"] != "copy_risk"],
            "first_flagged_step": next((p["step"] for p in probes if p["flagged_fraction"] > 0), None),
            "lowest_val_loss_step": min(losses, key=lambda p: p["val_diffusion_loss"])["step"] if losses else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a train-prior run folder")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = trajectory(args.run)
    print("| step | held-out diffusion loss | probe samples flagged | nearest training distance (threshold) |")
    print("|---|---|---|---|")
    for p in result["probes"]:
        loss = "-" if p["val_diffusion_loss"] is None else f"{p['val_diffusion_loss']:.3f}"
        print(f"| {p['step']} | {loss} | {p['flagged_fraction']:.2f} | {p['nearest_distance']:.4f} ({p['threshold']:.4f}) |")
    print(f"first flagged at step {result['first_flagged_step']}; lowest held-out loss at step "
          f"{result['lowest_val_loss_step']}; {len(result['copy_risk_events'])} copy_risk events, "
          f"{len(result['other_events'])} other events")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
