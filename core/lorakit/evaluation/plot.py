"""``loss.png``: training loss and eval loss per step, read from ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path


def read_curves(metrics_path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train points, eval points) as (step, loss)."""
    train: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    from lorakit.rundir import metric_records

    for rec in metric_records(metrics_path):
        step = rec.get("step")
        if not isinstance(step, int) or isinstance(step, bool):  # a damaged record: read around it
            continue
        if isinstance(rec.get("loss"), (int, float)):
            train.append((step, float(rec["loss"])))
        if isinstance(rec.get("eval_loss"), (int, float)):
            evals.append((step, float(rec["eval_loss"])))
    return train, evals


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """Draw the curves with matplotlib's Agg backend (no display needed); None if no data."""
    train, evals = read_curves(metrics_path)
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
