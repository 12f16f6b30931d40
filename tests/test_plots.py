"""dpo.run.plots: the training-curves PNG is written atomically, at a fixed size, from train and eval rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dpo.run import plots

WIDTH, HEIGHT = int(plots.FIG_SIZE_IN[0] * plots.DPI), int(plots.FIG_SIZE_IN[1] * plots.DPI)


def _train_row(step: int) -> dict:
    margin = 0.02 * step + 0.3 * math.sin(step)
    return {
        "step": step,
        "loss": math.log1p(math.exp(-margin)),
        "rewards/chosen": 0.5 * margin,
        "rewards/rejected": -0.5 * margin,
        "rewards/accuracies": 0.5 + 0.4 * math.tanh(margin),
        "rewards/margins": margin,
        "logps/chosen": -100.0 + step * 0.1,
        "logps/rejected": -110.0 - step * 0.2,
        "grad_norm": 3.0 + math.cos(step),
        "learning_rate": 5e-6 * (1 - step / 100),
    }


def _eval_row(step: int) -> dict:
    return {
        "step": step,
        "eval_loss": 0.6 - step / 500,
        "eval_rewards/accuracies": 0.55 + step / 400,
        "eval_rewards/margins": step / 100,
        "eval_rewards/chosen": step / 300,
        "eval_rewards/rejected": -step / 150,
        "eval_logps/chosen": -101.0,
        "eval_logps/rejected": -112.0 - step / 10,
    }


def _write(path, rows, tail: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")
    return path


def _read_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(str(path))


def _assert_readable_png(path):
    img = _read_png(path)
    assert img.shape[:2] == (HEIGHT, WIDTH)
    assert float(np.std(img[..., :3])) > 0.05, "the figure looks blank"
    assert path.stat().st_size > 20_000


def test_train_and_eval_rows_make_a_full_size_png(tmp_path):
    rows = []
    for step in range(1, 81):
        rows.append(_train_row(step))
        if step % 20 == 0:
            rows.append(_eval_row(step))
    rows.append({**_train_row(81), **_eval_row(81)})  # a line carrying both kinds at once
    metrics = _write(tmp_path / "metrics.jsonl", rows)
    out = plots.plot_curves(metrics, tmp_path / "sub" / "curves.png")
    assert out == tmp_path / "sub" / "curves.png"
    _assert_readable_png(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"], "temp file left behind"


def test_existing_png_is_replaced(tmp_path):
    metrics = _write(tmp_path / "metrics.jsonl", [_train_row(s) for s in range(1, 30)])
    out = tmp_path / "curves.png"
    out.write_bytes(b"old")
    plots.plot_curves(metrics, out)
    _assert_readable_png(out)


def test_one_row_still_gives_a_readable_figure(tmp_path):
    metrics = _write(tmp_path / "metrics.jsonl", [_train_row(1)])
    _assert_readable_png(plots.plot_curves(metrics, tmp_path / "curves.png"))


def test_eval_only_rows(tmp_path):
    metrics = _write(tmp_path / "metrics.jsonl", [_eval_row(10), _eval_row(20)])
    _assert_readable_png(plots.plot_curves(metrics, tmp_path / "curves.png"))


def test_empty_file_raises_a_clear_error_and_writes_nothing(tmp_path):
    metrics = _write(tmp_path / "metrics.jsonl", [], tail="\n\n")
    out = tmp_path / "curves.png"
    with pytest.raises(ValueError, match="no metrics to plot"):
        plots.plot_curves(metrics, out)
    assert list(tmp_path.iterdir()) == [metrics]


def test_half_written_last_line_is_ignored_but_a_bad_middle_line_is_an_error(tmp_path):
    rows = [_train_row(s) for s in range(1, 5)]
    metrics = _write(tmp_path / "metrics.jsonl", rows, tail='{"step": 5, "lo')
    assert len(plots.read_metrics(metrics)) == 4
    _write(metrics, rows[:2], tail="garbage\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not valid JSON"):
        plots.read_metrics(metrics)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics file not found"):
        plots.plot_curves(tmp_path / "nope.jsonl", tmp_path / "curves.png")


def test_ema_is_debiased_and_light():
    assert plots.ema([3.0, 3.0, 3.0], 0.8) == pytest.approx([3.0, 3.0, 3.0])
    assert plots.ema([1.0, 2.0], 0.5)[0] == 1.0
    assert plots.smoothing_for(5) == 0.0
    assert 0.0 < plots.smoothing_for(40) <= 0.8


def test_cli(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _write(run / "metrics.jsonl", [_train_row(s) for s in range(1, 15)])
    assert plots.main([str(run)]) == 0
    assert "curves.png" in capsys.readouterr().out
    _assert_readable_png(run / "curves.png")
    (run / "metrics.jsonl").write_text("")
    assert plots.main([str(run / "metrics.jsonl"), str(tmp_path / "x.png")]) == 2
    assert "no metrics to plot" in capsys.readouterr().err
