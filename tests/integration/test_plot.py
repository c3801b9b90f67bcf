"""Plots: a run's training curves and a sweep's comparison, drawn from saved metrics.

The figures and tables are built from metrics.csv files written here, in the layout the CSV
logger writes (one row per logging call, empty cells for the metrics it did not log); one test
trains a tiny run, so that the metric names a real run logs are the ones the panels draw.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest

from kto_lightning.cli.lifecycle import TrainingCurves
from kto_lightning.cli.run_fit import train
from kto_lightning.plot import main as plot_main
from kto_lightning.reporting.plots import FILENAME, SWEEP_FILENAME, draw_run, draw_sweep
from kto_lightning.reporting.sweep_report import SUMMARY_FILE, find_jobs, short_labels
from kto_lightning.runs.run_records import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"
KTO_METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "loss", "loss/desirable",
    "loss/undesirable", "rewards/accuracy",
)  # fmt: skip


def _write_metrics(run_dir: Path, rows: list[dict[str, float | int]]) -> None:
    """metrics.csv as the CSV logger writes it: the union of the keys, sorted, as its header."""
    header = sorted({key for row in rows for key in row} | {"step", "epoch"})
    (run_dir / "csv").mkdir(parents=True, exist_ok=True)
    with (run_dir / "csv" / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def _kto_rows(steps: int = 6, scale: float = 1.0, validate: bool = True) -> list[dict]:
    """A KTO run's rows: a training row per step; validation before training and at the end."""
    rows: list[dict] = []
    for step in range(steps):
        rows.append({"step": step, "epoch": 0, **{f"train/{m}": 0.1 * step for m in KTO_METRICS}})
    if validate:
        for step, progress in ((0, 0.0), (steps - 1, 1.0)):
            values = {f"val/{m}": scale * (0.2 + progress) for m in KTO_METRICS}
            values["val/rewards/auroc"] = scale * (0.5 + 0.4 * progress)
            values["val/count/desirable"] = 9.0
            rows.append({"step": step, "epoch": 0, **values})
    return rows


def test_run_figure_labels_every_panel_and_gives_a_metric_one_colour(tmp_path) -> None:
    _write_metrics(tmp_path, _kto_rows())
    figure = draw_run(read_metrics(tmp_path), "run")
    panels = {ax.get_title(): ax for ax in figure.axes}
    assert set(panels) == {
        "rewards", "reward margin", "KL reference point", "loss", "reward AUROC and accuracy",
    }  # fmt: skip
    for title, ax in panels.items():
        assert ax.get_ylabel() and ax.get_xlabel() == "optimizer step", title
        lines = {line.get_label(): line for line in ax.get_lines()}
        for name in {label.split("/", 1)[1] for label in lines}:
            train_line, val_line = lines.get(f"train/{name}"), lines.get(f"val/{name}")
            if train_line is not None and val_line is not None:
                # One colour per metric; the stage shows in the line style and the markers.
                assert train_line.get_color() == val_line.get_color(), (title, name)
                assert train_line.get_linestyle() == "-" and val_line.get_linestyle() == "--"
                assert val_line.get_marker() == "o"
        colours = [line.get_color() for label, line in lines.items() if label.startswith("val/")]
        assert len(set(colours)) == len(colours), f"{title}: two metrics share a colour"
    auroc = panels["reward AUROC and accuracy"]
    assert {line.get_label() for line in auroc.get_lines()} == {
        "val/rewards/auroc", "train/rewards/accuracy", "val/rewards/accuracy",
    }  # fmt: skip
    plt.close(figure)

    assert plot_main([f"ckpt_path={tmp_path}"]) == 0
    assert (tmp_path / FILENAME).read_bytes()[:8] == PNG


def test_a_run_without_kto_metrics_plots_what_it_has(tmp_path) -> None:
    """An SFT run logs its loss and perplexity, no rewards and no KL."""
    rows = [{"step": s, "train/loss": 2.0 - 0.1 * s, "train/perplexity": 7.0 - s} for s in range(4)]
    rows.append({"step": 3, "val/loss": 1.8, "val/perplexity": 6.0})
    _write_metrics(tmp_path, rows)
    figure = draw_run(read_metrics(tmp_path), "sft")
    assert [ax.get_title() for ax in figure.axes] == ["loss", "perplexity"]
    plt.close(figure)
    assert plot_main([f"ckpt_path={tmp_path}", f"out={tmp_path / 'sft.png'}"]) == 0
    assert (tmp_path / "sft.png").read_bytes()[:8] == PNG


def _sweep(tmp_path: Path) -> Path:
    """A sweep of four jobs as Hydra and sweeps.record leave it: two completed, one failed before
    it logged anything, one diverged before its first validation; and a job the table lacks."""
    sweep = tmp_path / "sweep"
    common = ["debug=fast", "+hf_token=***"]
    jobs = {
        0: ("loss.beta=0.05", "completed", 0.7),
        1: ("loss.beta=0.1", "completed", 0.9),
        2: ("loss.beta=-1", "failed", None),
        3: ("loss.beta=0.3", "diverged", None),
    }
    table = []
    for number, (override, status, scale) in jobs.items():
        run_dir = sweep / f"{number}_{override}"
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(
            "".join(f"- {o}\n" for o in [common[0], override, common[1]])
        )
        if scale is not None:
            _write_metrics(run_dir, _kto_rows(scale=scale))
        elif status == "diverged":
            _write_metrics(run_dir, _kto_rows(steps=2, validate=False))
        value = "" if scale is None else repr(scale * 0.9)
        message = "loss.beta must be > 0, got -1" if status == "failed" else ""
        # Job 1's table row names the folder where the sweep ran before it was copied here.
        where = f"/elsewhere/sweep/{run_dir.name}" if number == 1 else str(run_dir)
        table.append([number, f"{common[0]} {override} {common[1]}", "val/rewards/auroc", value,
                      status, where, message])  # fmt: skip
    with (sweep / "sweep_results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["job", "overrides", "objective", "value", "status", "run_dir", "message"])
        writer.writerows(table)
    # Job 4 ran (its folder, metrics and objective are there) but is not in the table.
    extra = sweep / "4_loss.beta=0.5"
    (extra / ".hydra").mkdir(parents=True)
    (extra / ".hydra" / "overrides.yaml").write_text("- debug=fast\n- loss.beta=0.5\n")
    _write_metrics(extra, _kto_rows(scale=0.8))
    (extra / "objective.json").write_text(
        json.dumps({"objective": "val/rewards/auroc", "value": 0.72})
    )
    return sweep


def test_a_sweep_overlays_its_jobs_and_tabulates_the_failed_ones(tmp_path, capsys) -> None:
    sweep = _sweep(tmp_path)
    assert plot_main([f"ckpt_path={sweep}"]) == 0
    printed = capsys.readouterr().out
    assert (sweep / SWEEP_FILENAME).read_bytes()[:8] == PNG

    with (sweep / SUMMARY_FILE).open(newline="") as handle:
        rows = {row["job"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["0", "1", "2", "3", "4"]
    # The final metrics are those of each run's last validation row.
    assert float(rows["1"]["val/rewards/auroc"]) == pytest.approx(0.9 * 0.9)
    assert float(rows["1"]["val/kl"]) == pytest.approx(0.9 * 1.2)
    assert rows["1"]["run_dir"] == str(sweep / "1_loss.beta=0.1"), "found where it is now"
    assert float(rows["1"]["objective_value"]) == pytest.approx(0.81)
    assert float(rows["4"]["objective_value"]) == 0.72 and rows["4"]["status"] == ""
    assert rows["4"]["overrides"] == "debug=fast loss.beta=0.5"
    assert rows["2"]["status"] == "failed" and "beta must be > 0" in rows["2"]["note"]
    assert rows["2"]["val/rewards/auroc"] == "" and rows["3"]["status"] == "diverged"
    assert rows["3"]["note"] == "no validation rows in csv/metrics.csv"
    assert "failed" in printed and "#2 loss.beta=-1" in printed and "0.8100" in printed

    # The figure: the three jobs that validated, one colour each in every panel, a legend that
    # names each by the overrides that differ (not debug=fast, which all share).
    jobs = find_jobs(sweep)
    labels = dict(zip((job.name for job in jobs), short_labels(jobs), strict=True))
    assert labels["0"] == "#0 loss.beta=0.05 +hf_token=***"
    assert labels["4"] == "#4 loss.beta=0.5", "no token override: the others' shows as differing"
    plotted = [job for job in jobs if job.plotted]
    assert [job.name for job in plotted] == ["0", "1", "4"]
    figure = draw_sweep(plotted, [labels[job.name] for job in plotted], "sweep")
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == [
        "validation reward AUROC", "validation reward margin", "validation KL reference point",
        "validation loss",
    ]  # fmt: skip
    colours = None
    for ax in figure.axes:
        assert ax.get_ylabel()
        assert [line.get_label() for line in ax.get_lines()] == [labels[j.name] for j in plotted]
        panel_colours = [line.get_color() for line in ax.get_lines()]
        assert len(set(map(tuple, panel_colours))) == len(plotted)
        assert colours is None or panel_colours == colours, "a job keeps its colour"
        colours = panel_colours
    legend = figure.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == [labels[j.name] for j in plotted]
    plt.close(figure)


def test_folders_that_hold_no_run_are_named(tmp_path, capsys) -> None:
    assert plot_main([f"ckpt_path={tmp_path / 'missing'}"]) == 1
    assert "missing is not a folder" in capsys.readouterr().err
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    assert plot_main([f"ckpt_path={tmp_path / 'empty'}"]) == 1
    assert f"{tmp_path / 'empty'} holds no run" in capsys.readouterr().err

    # A sweep whose jobs all failed: their table, and no figure.
    failed = tmp_path / "failed" / "0_loss.beta=-1" / ".hydra"
    failed.mkdir(parents=True)
    (failed / "overrides.yaml").write_text("- loss.beta=-1\n")
    assert plot_main([f"ckpt_path={tmp_path / 'failed'}"]) == 1
    out, err = capsys.readouterr()
    assert "no csv/metrics.csv" in out and "no job" in err
    assert (tmp_path / "failed" / SUMMARY_FILE).is_file()
    assert not (tmp_path / "failed" / SWEEP_FILENAME).exists()

    bad = tmp_path / "bad"
    _write_metrics(bad, [{"step": 0, "train/loss": 1.0}, {"step": 1, "train/loss": "oops"}])
    assert plot_main([f"ckpt_path={bad}"]) == 1
    assert "metrics.csv, line 3, column 'train/loss': 'oops' is not a number" in (
        capsys.readouterr().err
    )


def test_training_curves_callback_skips_a_run_with_nothing_to_draw(tmp_path, caplog) -> None:
    _write_metrics(tmp_path, [{"step": 0, "lr-AdamW/pg1": 0.001}])
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True)
    TrainingCurves().on_fit_end(trainer, None)
    assert not (tmp_path / FILENAME).exists()
    assert "no training curves" in caplog.text


def test_a_trained_run_draws_its_curves_at_the_end(make_config, tmp_path) -> None:
    # No generations and no export: only the curves are looked at.
    train(make_config("~callbacks.generations", "export.enabled=false"))
    png = tmp_path / FILENAME
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == PNG
    # The names a real run logs are those the panels draw: every panel has a curve, and the
    # validation at the last step was on disk when the curves were drawn.
    series = read_metrics(tmp_path)
    assert series["val/rewards/auroc"][-1][0] == series["train/loss"][-1][0] > 0
    figure = draw_run(series, "run")
    assert len(figure.axes) == 5 and all(ax.get_lines() for ax in figure.axes)
    plt.close(figure)
    # The command redraws it from the saved metrics.
    out = tmp_path / "again.png"
    assert plot_main([f"ckpt_path={tmp_path}", f"out={out}"]) == 0
    assert out.is_file() and out.stat().st_size > 10_000
