"""Table + plot of the encoder bake-off (scripts/bakeoff.sh): held-out 1 x k reconstruction per arm, and each
arm's training loss against CPU-minutes.   python scripts/bakeoff_report.py [runs] [docs/bakeoff.png]"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def series(run: Path, name: str) -> list[tuple[float, float]]:
    """(step, value) of one metric from a run's metrics.csv."""
    with (run / "metrics.csv").open(newline="") as f:
        return [(float(r["step"]), float(r["value"])) for r in csv.DictReader(f) if r["name"] == name]


def main(runs: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    print("| arm | steps | CPU-min | train loss (last 20 steps) | held-out 1x16 log-ppl | token acc | greedy exact |"
          " greedy acc pos 1 / 8 / 16 |")
    print("|---|---|---|---|---|---|---|---|")
    for run in sorted(runs.glob("bake-*")):
        if not (run / "eval.json").is_file():
            continue
        report = json.loads((run / "eval.json").read_text())
        row, greedy = report["rows"][0], report["greedy"]
        loss, elapsed = series(run, "train/loss"), dict(series(run, "train/elapsed_s"))
        minutes = [elapsed[s] / 60 for s, _ in loss]
        tail = [v for _, v in loss[-20:]]
        pos = greedy["position_accuracy"]
        print(f"| {run.name[5:]} | {int(loss[-1][0])} | {minutes[-1]:.1f} | {sum(tail) / len(tail):.3f} | "
              f"{row['log_ppl']:.3f} | {row['accuracy']:.3f} | {greedy['exact']:.3f} | "
              f"{pos[0]:.2f} / {pos[len(pos) // 2 - 1]:.2f} / {pos[-1]:.2f} |")
        values = [v for _, v in loss]
        smooth = [sum(values[max(0, i - 9) : i + 1]) / len(values[max(0, i - 9) : i + 1]) for i in range(len(values))]
        ax.plot(minutes, smooth, label=f"{run.name[5:]} (held-out acc {row['accuracy']:.3f})", lw=1.2)
    ax.set(xlabel="CPU-minutes (2 cores)", ylabel="train loss, mean of 10 steps (1 x 16)", title="Encoder bake-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    print(f"\n![bake-off]({png.name})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"), Path(sys.argv[2] if len(sys.argv) > 2 else "docs/bakeoff.png"))
