"""Draw a run's metrics.csv as one picture, curves.png: no TensorBoard needed.

    python plot_metrics.py runs/coco                  # writes runs/coco/curves.png
    python plot_metrics.py runs/coco_scst --out scst.png

Panels, for the columns a run has: training and validation loss, top-5 accuracy, SCST's reward and
baseline, the validation score of decoded captions (BLEU-4, and CIDEr-D for scst.py), and the
learning rates. A dashed line marks the epoch best.pt came from: the first epoch with the best
validation score (CIDEr-D for scst.py, BLEU-4 for train.py), the rule both scripts keep best.pt by.
train.py and scst.py write curves.png themselves when they finish; this draws it at any time.
"""

import argparse
import csv
import io
import json
import math
from pathlib import Path

from utils import UserError, atomic_write, run_main

# (title, metrics.csv columns, log scale)
PANELS = [("loss", ("train_loss", "val_tf_loss"), False),
          ("top-5 accuracy", ("train_top5", "val_tf_top5"), False),
          ("reward (CIDEr-D of sampled captions)", ("train_reward", "train_baseline"), False),
          ("validation score (decoded captions)", ("val_decoded_bleu4", "val_decoded_cider"), False),
          ("learning rate", ("decoder_lr", "encoder_lr"), True)]
LABELS = {"train_loss": "train (teacher-forced)", "val_tf_loss": "val (teacher-forced)", "train_top5": "train",
          "val_tf_top5": "val (teacher-forced)", "train_reward": "reward", "train_baseline": "baseline",
          "val_decoded_bleu4": "BLEU-4", "val_decoded_cider": "CIDEr-D", "decoder_lr": "decoder",
          "encoder_lr": "encoder"}


def parse_args(argv=None):
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a run's --output-dir, holding the metrics.csv of train.py or scst.py")
    parser.add_argument("--out", type=Path, default=None, help="where the picture goes (default RUN_DIR/curves.png)")
    return parser.parse_args(argv)


def read_metrics(path):
    """metrics.csv as {column: [float per epoch]} (empty cells as NaN)."""
    if not path.is_file():
        raise UserError(f"{path}: not found; pass the --output-dir of a run that has finished an epoch")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f"{path}: holds no epoch yet; draw it after the first epoch has finished")
    try:
        return {column: [float(row[column]) if row[column] not in ("", None) else math.nan for row in rows]
                for column in rows[0]}
    except ValueError as exc:
        raise UserError(f"{path}: is not a metrics.csv of train.py or scst.py ({exc})") from None


def best_epoch(metrics):
    """The epoch best.pt came from: the first with the highest validation CIDEr-D (scst.py) or BLEU-4."""
    score = metrics.get("val_decoded_cider") or metrics.get("val_decoded_bleu4")
    if not score:
        return None
    best = max(range(len(score)), key=lambda i: (score[i], -i))  # the first of equal scores, as best.pt keeps
    return int(metrics["epoch"][best])


def run_labels(run_dir):
    """LABELS for the run in `run_dir`: an scst.py run rewarded against the closest reference (its
    args.json says so) has its reward and validation CIDEr-D named so, since that score runs higher than
    CIDEr-D against every reference, which eval.py reports."""
    args_path = Path(run_dir) / "args.json"
    try:
        closest = json.loads(args_path.read_text()).get("reward_against") == "closest"
    except (OSError, ValueError, AttributeError):  # no args.json, or not one of ours: the plain names
        closest = False
    if not closest:
        return LABELS
    return {**LABELS, "train_reward": "reward (closest reference)",
            "val_decoded_cider": "CIDEr-D (closest reference)"}


def draw_curves(metrics, out_path, labels=LABELS):
    """Draw the panels of `metrics` (read_metrics) into `out_path`, written whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def shown(column, log):  # a column the run has; a log-scale one without its zeros (a frozen encoder's lr)
        return column in metrics and any(v > 0 if log else not math.isnan(v) for v in metrics[column])

    panels = [(title, [c for c in columns if shown(c, log)], log) for title, columns, log in PANELS]
    panels = [panel for panel in panels if panel[1]]
    epochs, best = metrics["epoch"], best_epoch(metrics)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, columns, log) in zip(axes[0], panels):
        for column in columns:
            ax.plot(epochs, metrics[column], marker="o", markersize=3, label=labels.get(column, column))
        if best is not None:
            ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best.pt (epoch {best})")
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out_path, lambda f: f.write(buffer.getvalue()), binary=True)


def write_curves(run_dir, out_path=None):
    """curves.png (or `out_path`) of the metrics.csv in `run_dir`; returns its path."""
    out_path = Path(out_path or Path(run_dir) / "curves.png")
    draw_curves(read_metrics(Path(run_dir) / "metrics.csv"), out_path, run_labels(run_dir))
    return out_path


def main(argv=None):
    """Draw the picture and print where it went; returns its path."""
    args = parse_args(argv)
    out_path = write_curves(args.run_dir, args.out)
    print(f"curves: {out_path}")
    return out_path


if __name__ == "__main__":
    run_main(lambda: main(), "plot_metrics.py")
