"""Training curves from a run's `metrics.jsonl`: one PNG a person can read at a glance.

`plot_curves(metrics_path, out_png)` draws six panels over optimizer steps -- DPO loss, reward
accuracy, reward margin, chosen vs rejected rewards, chosen vs rejected log-probs, and gradient norm
with the learning rate -- with train lines EMA-smoothed over a faint raw line, and eval points
(TRL's `eval_` keys) as markers joined by dashed lines. It never touches pyplot's global state (the
Agg canvas is used directly), and writes the PNG atomically (temp file, then rename).

A file with no metric rows raises `ValueError`; a single row still gives a readable figure (points
drawn as markers). A truncated last line (a run still writing) is ignored; a bad line elsewhere is
an error naming its line number.

    python -m dpo.run.plots RUN/metrics.jsonl RUN/curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from matplotlib.ticker import MaxNLocator

FIG_SIZE_IN = (14.0, 12.0)
DPI = 100  # -> a 1400 x 1200 pixel PNG

TRAIN_COLOR = "tab:blue"
EVAL_COLOR = "tab:orange"
CHOSEN_COLOR = "tab:green"
REJECTED_COLOR = "tab:red"


def read_metrics(metrics_path) -> list[dict]:
    """The JSON objects of a metrics.jsonl file, in order (blank lines skipped)."""
    path = Path(metrics_path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows: list[dict] = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if k == len(numbered) - 1:  # a run still appending: the last line may be half written
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry a finite number under `key`."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        v = row.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        step = row.get("step")
        xs.append(float(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else float(i + 1))
        ys.append(float(v))
    return xs, ys


def ema(values: list[float], smoothing: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing slider): no lag towards 0 at the start."""
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc = smoothing * acc + (1.0 - smoothing) * v
        weight = smoothing * weight + (1.0 - smoothing)
        out.append(acc / weight)
    return out


def smoothing_for(n: int) -> float:
    """Light smoothing that grows with the number of points: none up to 10 points, at most 0.8."""
    if n <= 10:
        return 0.0
    return min(0.8, 1.0 - 8.0 / n)


def _train_line(ax, xs, ys, color, label) -> None:
    """A train series: EMA-smoothed line over the faint raw one (markers when there are few points)."""
    if not xs:
        return
    marker = "o" if len(xs) <= 20 else None
    s = smoothing_for(len(ys))
    if s > 0:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1.0)
        ax.plot(xs, ema(ys, s), color=color, linewidth=2.0, label=f"{label} (smoothed)")
    else:
        ax.plot(xs, ys, color=color, linewidth=2.0, marker=marker, markersize=4, label=label)


def _eval_line(ax, xs, ys, color, label) -> None:
    if xs:
        ax.plot(xs, ys, color=color, linestyle="--", marker="o", markersize=6, linewidth=1.5, label=label)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _finish(ax, title: str, ylabel: str, has_data: bool, legend: bool = True) -> None:
    ax.set_title(title, fontsize=12, fontweight="bold")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if has_data:
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=9, framealpha=0.8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray", fontsize=14)


def _pair_panel(ax, rows, prefix: str, title: str, ylabel: str) -> bool:
    """Chosen and rejected `prefix/...` series, train and eval, on one axis."""
    any_data = False
    for part, color in (("chosen", CHOSEN_COLOR), ("rejected", REJECTED_COLOR)):
        xs, ys = _series(rows, f"{prefix}/{part}")
        _train_line(ax, xs, ys, color, f"train {part}")
        exs, eys = _series(rows, f"eval_{prefix}/{part}")
        _eval_line(ax, exs, eys, color, f"eval {part}")
        any_data |= bool(xs or exs)
    _finish(ax, title, ylabel, any_data)
    return any_data


def _train_eval_panel(ax, rows, key: str, title: str, ylabel: str) -> bool:
    xs, ys = _series(rows, key)
    _train_line(ax, xs, ys, TRAIN_COLOR, "train")
    exs, eys = _series(rows, f"eval_{key}")
    _eval_line(ax, exs, eys, EVAL_COLOR, "eval")
    has = bool(xs or exs)
    _finish(ax, title, ylabel, has)
    return has


def plot_curves(metrics_path, out_png) -> Path:
    """Draw the training curves of `metrics_path` (a metrics.jsonl) into `out_png`; returns its path.

    Raises ValueError when the file holds no metric rows (nothing to draw)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics_path = Path(metrics_path)
    out_png = Path(out_png)
    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"no metrics to plot: {metrics_path} has no rows yet")

    fig = Figure(figsize=FIG_SIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 2)
    _reward_panels(axes, rows)
    _grad_norm_and_lr_panel(axes[2][1], rows)
    _label_figure(fig, rows, metrics_path)
    _save_png(fig, out_png)
    return out_png


def _reward_panels(axes, rows: list[dict]) -> None:
    """Loss, reward accuracy, margin, chosen/rejected rewards and log-probs: five of the six panels."""
    ax = axes[0][0]
    has_loss = _train_eval_panel(ax, rows, "loss", "DPO loss (lower is better)", "loss")
    if has_loss:
        ax.axhline(math.log(2.0), color="gray", linestyle=":", linewidth=1.0, label="ln 2 (policy = reference)")
        ax.legend(loc="best", fontsize=9, framealpha=0.8)

    ax = axes[0][1]
    if _train_eval_panel(
        ax, rows, "rewards/accuracies", "Reward accuracy (chosen reward > rejected)", "fraction of pairs"
    ):
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1.0, label="chance (0.5)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="best", fontsize=9, framealpha=0.8)

    ax = axes[1][0]
    if _train_eval_panel(ax, rows, "rewards/margins", "Reward margin (chosen - rejected)", "reward margin"):
        ax.axhline(0.0, color="gray", linestyle=":", linewidth=1.0)

    ax = axes[1][1]
    if _pair_panel(ax, rows, "rewards", "Implicit rewards: chosen vs rejected", "beta * log-ratio to reference"):
        ax.axhline(0.0, color="gray", linestyle=":", linewidth=1.0)

    _pair_panel(axes[2][0], rows, "logps", "Policy log-probs: chosen vs rejected", "summed log-prob")


def _grad_norm_and_lr_panel(ax, rows: list[dict]) -> None:
    xs, ys = _series(rows, "grad_norm")
    _train_line(ax, xs, ys, "tab:purple", "grad norm")
    lxs, lys = _series(rows, "learning_rate")
    if lxs:
        ax2 = ax.twinx()
        ax2.plot(lxs, lys, color="tab:gray", linewidth=1.5, linestyle="-.", label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:gray")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=9, framealpha=0.8)
    _finish(ax, "Gradient norm and learning rate", "grad norm (pre-clip)", bool(xs or lxs), legend=not lxs)


def _label_figure(fig, rows: list[dict], metrics_path: Path) -> None:
    """The title (run name, row counts), the legend of line styles, and a centred axis for a single point."""
    n_train = sum(1 for r in rows if "loss" in r)
    n_eval = sum(1 for r in rows if "eval_loss" in r)
    steps = [s for s, _ in zip(*_series(rows, "loss"))] or [0.0]
    run_name = metrics_path.parent.name or str(metrics_path)
    fig.suptitle(
        f"DPO training curves: {run_name}  ({_plural(n_train, 'train row')} up to step {int(max(steps))}, "
        f"{_plural(n_eval, 'eval row')})",
        fontsize=14,
    )
    fig.supxlabel(
        "solid: train (EMA-smoothed where noisy, raw values faint behind)      dashed with markers: eval",
        fontsize=10, color="dimgray",
    )
    all_steps = sorted({x for key in ("loss", "eval_loss") for x in _series(rows, key)[0]})
    if len(all_steps) == 1:  # one point: centre it instead of a 0.96..1.04 axis
        for ax in fig.axes:
            ax.set_xlim(all_steps[0] - 1, all_steps[0] + 1)


def _save_png(fig, out_png: Path) -> None:
    """The figure at `out_png`, whole or not at all (a temporary name, then one rename)."""
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, out_png)
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo.run.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", help="path of a run's metrics.jsonl (or the run directory)")
    parser.add_argument("out_png", nargs="?", help="PNG to write (default: curves.png beside the metrics)")
    args = parser.parse_args(argv)
    metrics = Path(args.metrics)
    if metrics.is_dir():
        metrics = metrics / "metrics.jsonl"
    out = Path(args.out_png) if args.out_png else metrics.with_name("curves.png")
    try:
        written = plot_curves(metrics, out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
