"""What the main job's training did, for the page's Model tab: the numbers and the training curve.

model_report(run_dir, png) reads the run directory (summary.json, config.json, metrics.jsonl and
the precision@10 history precision.jsonl that app.quickstart appends to) and draws the loss and
precision@10 over training time into `png` (matplotlib, without a display).
"""
from __future__ import annotations

import json
from pathlib import Path

SOURCE_NOTE = ("1,000 photographs of five kinds of flowers from the TensorFlow `flower_photos` collection, "
               "each licensed CC BY 2.0 by its Flickr photographer and shipped resized; the credit lines are in "
               "`app/data/CREDITS.txt`.")


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed process
            continue
    return rows


def plot_training(metrics: list[dict], history: list[dict], png: Path) -> Path | None:
    """Loss (left) and precision@10 (right) against training minutes -> png; None without loss values."""
    losses = [(r["train_seconds"] / 60, r["loss"]) for r in metrics if "loss" in r and "train_seconds" in r]
    if not losses:
        return None
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 3.4), dpi=100, layout="constrained")
    ax_loss, ax_p = fig.subplots(1, 2)
    ax_loss.plot(*zip(*losses), color="tab:blue", linewidth=1.2, marker="o" if len(losses) < 20 else None)
    ax_loss.set(title="BYOL loss", xlabel="training time (min)", ylabel="loss")
    ax_loss.grid(alpha=0.3)
    if history:
        last = history[-1]
        points = [(0.0, last["random_init"])] + [(h["train_seconds"] / 60, h["byol"]) for h in history]
        ax_p.plot(*zip(*points), "o-", color="tab:green", label="BYOL encoder")
        for key, label, style in (("random_init", "same network, random init", "--"),
                                  ("pixels", "normalised pixels", ":"), ("chance", "chance", "-.")):
            ax_p.axhline(last[key], color="grey" if key == "chance" else "tab:orange" if key == "pixels"
                         else "tab:red", linestyle=style, linewidth=1, label=label)
        ax_p.set_ylim(0, 1)
        ax_p.legend(loc="upper left", fontsize=8)
    else:
        ax_p.text(0.5, 0.5, "not measured\n(no labels, or --no-compare)", ha="center", va="center",
                  transform=ax_p.transAxes)
    ax_p.set(title="precision@10 on the indexed images", xlabel="training time (min)")
    ax_p.grid(alpha=0.3)
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    return png


def model_report(run_dir: Path, png: Path, shipped: bool = False) -> dict:
    """-> {"markdown": the Model tab's text, "plot": path of the curve or None, "scores": last comparison}."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    history = read_jsonl(run_dir / "precision.jsonl")
    plot = plot_training(read_jsonl(run_dir / "metrics.jsonl"), history, png)
    m, d, o = config["model"], config["data"], config["optim"]
    seconds = summary["train_seconds"]
    lines = ["### The encoder", "| | |", "| --- | --- |",
             (f"| training | BYOL for {seconds / 60:.1f} min ({seconds:.0f} s), {summary['steps']:,} steps of "
             f"{o['batch_size']} images, preset `{config.get('preset') or 'custom'}`, "
             f"{summary.get('precision', '')} on {config['run']['device']} |"),
             f"| network | {m['arch']} ({m['stem']} stem), {d['image_size']} px input |",
             f"| final loss | {summary['loss']:.3f} |"]
    scores = history[-1] if history and history[-1]["step"] == summary["steps"] else None
    lines += ["", "### Retrieval quality: precision@10",
              ("The share of each image's 10 nearest other images that carry its label (the labels only score "
              "the search: BYOL never sees them).")]
    if scores:
        lines += ["", "| representation | precision@10 |", "| --- | --- |",
                  f"| **BYOL encoder** (trained without labels) | **{scores['byol']:.3f}** |",
                  f"| the same network at random initialisation | {scores['random_init']:.3f} |",
                  f"| normalised pixels | {scores['pixels']:.3f} |",
                  f"| chance | {scores['chance']:.3f} |"]
    else:
        lines += ["", "Not measured (the images have no labels, or the main job ran with `--no-compare`)."]
    if shipped:
        lines += ["", "### The images", SOURCE_NOTE]
    return {"markdown": "\n".join(lines), "plot": str(plot) if plot else None, "scores": scores}
