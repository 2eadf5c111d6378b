"""Every figure the project draws, checked as a reader would (issue 17, "Plots and tables"):
axis labels name their quantity and unit (no raw summary keys), no two lines of an axes look
alike (equal curves stay visible), legends sit outside the data, λ* is drawn wherever it is
defined, and the region is in the CLI's tokens/s."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from llmqueue import plots  # noqa: E402
from llmqueue.cli import main  # noqa: E402
from llmqueue.reproduce import figures  # noqa: E402

UNIT = re.compile(r"\((s|ms|tokens|%|log scale)\)|tokens/s|requests/s|requests in system|rate / min")
RAW_KEY = re.compile(r"\w+_(s|rps)\.\w+|_per_s\b|\w+_s\b")


@pytest.fixture
def drawn(monkeypatch):
    """The figures handed to ``save_figure``, drawn (so that legends and labels have their place)."""
    figs = []

    def keep(fig, path):
        fig.canvas.draw()
        figs.append(fig)
        return Path(path)

    monkeypatch.setattr(plots, "save_figure", keep)
    monkeypatch.setattr(figures, "save_figure", keep)
    return figs


def _data_axes(fig):
    return [ax for ax in fig.axes if ax.has_data()]


def check_figure(fig, *, legend_outside: bool = True) -> None:
    assert all(ax.get_xlabel() for ax in _data_axes(fig) if ax.get_subplotspec().is_last_row()), \
        "a bottom axes without an x label"
    for ax in _data_axes(fig):
        x, y = ax.get_xlabel(), ax.get_ylabel()
        assert not RAW_KEY.search(x) and not RAW_KEY.search(y), (x, y)
        if y:
            assert UNIT.search(y), f"no unit in the y label {y!r}"
        looks = [(line.get_color(), str(line.get_linestyle()), line.get_marker()) for line in ax.get_lines()
                 if not line.get_label().startswith("_") and len(line.get_xdata()) > 1]
        assert len(looks) == len(set(looks)), f"two lines look alike: {looks}"
        legend = ax.get_legend()
        if legend is not None and legend_outside:
            box, frame = legend.get_window_extent(), ax.get_window_extent()
            assert box.x0 >= frame.x1 - 1 or box.y0 >= frame.y1 - 1, "the legend covers the data"


def test_number_in_system_lines_are_distinct_and_labelled(capsys, tmp_path, drawn):
    code = main(["compare", "--horizon", "60", "--schedulers", "sarathi,vllm-v1,orca,vllm,fastertransformer",
                 "--out", str(tmp_path / "c")])
    assert code == 0, capsys.readouterr().err
    (fig,) = drawn
    check_figure(fig)
    lines = [ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
    assert len(lines) == 5
    # sarathi and vllm-v1 are equal here: their markers sit at different times, so both show
    a, b = (ln for ln in lines if ln.get_label().split()[0] in ("sarathi", "vllm-v1"))
    assert a.get_markevery() != b.get_markevery() and a.get_marker() != b.get_marker()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("plots") / "s.db"
    code = main(["sweep", "fig1", "--set", "run.horizon_s=60", "--grid", "workload.load=0.5,1.2",
                 "--grid", "engine.scheduler=sarathi,orca", "--jobs", "1", "--store", str(path)])
    assert code == 0
    return path


def test_stability_map_draws_lambda_star_with_a_single_budget(store, tmp_path, drawn):
    assert main(["plot", str(store), "--kind", "stability-map", "--out", str(tmp_path / "m.png")]) == 0
    (fig,) = drawn
    check_figure(fig)
    for ax in _data_axes(fig):
        star = [ln for ln in ax.get_lines() if ln.get_marker() == "|"]
        assert star and np.isfinite(star[0].get_xdata()).all()   # a tick at λ*, seen with one budget
        assert "requests/s" in ax.get_xlabel()


def test_latency_vs_load_reads_without_the_keys(store, tmp_path, drawn):
    assert main(["plot", str(store), "--kind", "latency-vs-load", "--out", str(tmp_path / "l.png")]) == 0
    (fig,) = drawn
    check_figure(fig)
    labels = [ax.get_ylabel() for ax in _data_axes(fig)]
    assert labels[0].startswith("time to first token p99 (s)") and "end-to-end latency p99 (s)" in labels[2]
    assert all(any(ln.get_xdata()[0] == 1.0 and len(set(ln.get_xdata())) == 1 for ln in ax.get_lines())
               for ax in _data_axes(fig)), "ρ = 1 is drawn in every panel"


def test_max_rate_vs_budget_has_lambda_star(tmp_path, drawn):
    rows = [{"scheduler": s, "token_budget": b, "rho": r, "max_stable_rate_rps": 10.0 + b / 256, "verdict": v}
            for s in ("orca", "sarathi") for b in (256, 512) for r, v in ((0.5, "stable"), (1.2, "unstable"))]
    plots.plot_max_rate_vs_budget([], rows, tmp_path / "x.png")
    (fig,) = drawn
    check_figure(fig)
    assert any(ln.get_label() == "λ* (Theorem 2)" for ln in fig.axes[0].get_lines())


def test_region_is_in_tokens_per_second_like_the_cli(capsys, tmp_path, drawn):
    assert main(["region", "point-c", "--plot", str(tmp_path / "r.png")]) == 0
    out = capsys.readouterr().out
    (fig,) = drawn
    check_figure(fig)
    ax = fig.axes[0]
    assert "tokens/s" in ax.get_xlabel() and "tokens/s" in ax.get_ylabel()
    star = next(ln for ln in ax.get_lines() if ln.get_marker() == "*")
    assert "tokens/s" in out and star.get_ydata()[0] > 100     # ≈ 2118 decode tokens/s, not 2.1 tokens/ms


def _series(n=50, level=100.0):
    t = np.linspace(0, 100, n)
    return {"time_s": t.tolist(), "in_system": (level + 0 * t).tolist()}


def test_the_reports_figures(tmp_path, drawn):
    names = ["fastertransformer", "vllm", "orca", "sarathi"]
    loads = [0.6, 0.75, 0.9, 0.95]
    figures.fig1({(load, s): (_series(), "stable") for load in loads for s in names}, loads, names, 13.87,
                 tmp_path / "a.png")
    figures.theorem2({(s, x): (10.0 * x, 1.0) for s in ("sarathi", "orca") for x in (0.8, 1.2)}, ["sarathi", "orca"],
                     [0.8, 1.2], 16.7, 3000.0, tmp_path / "b.png")
    figures.max_rate({f"max_rate[{s}]": {"max_rate_rps": r} for s, r in zip(names, (0.7, 11.7, 13.7, 13.7))}, names,
                     13.87, tmp_path / "c.png")
    figures.in_system_lines({f"run-{i}": (_series(), "stable") for i in range(11)}, "Point C", tmp_path / "d.png")
    points = {(s, b, f): {"ttft": {"p99": 1.0}, "tbt": {"p50": 0.05}, "e2e": {"p99": 9.0}}
              for s in ("sarathi", "orca") for b in (128, 2048) for f in (0.3, 0.9)}
    figures.latency(points, ["sarathi", "orca"], [128, 2048], [0.3, 0.9], 13.87, tmp_path / "e.png")
    for fig in drawn:
        check_figure(fig)
    fig1 = drawn[0]
    looks = {(ln.get_color(), ln.get_marker()) for ax in fig1.axes for ln in ax.get_lines()}
    assert len(looks) == len(names)          # one look per scheduler, the same in every panel
    latency = drawn[-1]
    assert all(any(ln.get_xdata()[0] == pytest.approx(13.87) for ln in ax.get_lines()) for ax in latency.axes)


def test_the_reports_region_is_in_tokens_per_second(tmp_path, drawn):
    from llmqueue.analysis.region import stability_region
    from llmqueue.model.batch_time import PAPER_STAIRCASE

    regions = {b: stability_region(PAPER_STAIRCASE, b, 100) for b in (128, 512)}
    position = regions[128].locate(13.0, 29.0, 99.0)
    figures.region(regions, position, [("sarathi-128", 128, (600.0, 2100.0), "stable")], tmp_path / "r.png")
    (fig,) = drawn
    check_figure(fig)
    ax = fig.axes[0]
    assert "tokens/s" in ax.get_xlabel() and max(max(ln.get_ydata()) for ln in ax.get_lines()) > 1000


def test_tables_print_units():
    from llmqueue.cli.common import table

    head = table([]).splitlines()[0]   # the header is built before any row
    for unit in ("req/s", "tok/s", "TTFT p50 (s)", "E2E p99 (s)"):
        assert unit in head, (unit, head)


def test_the_network_backlog_with_its_fluid_path(capsys, tmp_path, drawn):
    code = main(["network", "simulate", "rybko-stolyar", "--set", "run.horizon_s=600", "--plot", str(tmp_path / "n.png")])
    assert code == 0, capsys.readouterr().err
    (fig,) = drawn
    check_figure(fig)
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert "network backlog (simulated)" in labels and any(lab.startswith("network backlog, fluid") for lab in labels)


def test_network_tables_print_units(capsys):
    assert main(["network", "simulate", "rybko-stolyar", "--set", "run.horizon_s=300"]) == 0
    out = capsys.readouterr().out
    assert "TTFT p50 (s)" in out and "E2E p99 (s)" in out and "hop p50 (s)" in out


def test_the_serve_bench_figure(tmp_path, drawn):
    from llmqueue.serve import bench

    point = {"ttft_s": 0.05, "tpot_s": 0.02, "throughput_rps": 4.0}
    rows = [{"rate_rps": r, **{k: {q: v * r for q, v in point.items()}
                               for k in ("measured", "predicted", "predicted_grid", "predicted_run")}}
            for r in (4.0, 8.0, 12.0)]
    bench.plot({"rows": rows, "saturation": {"capacity_rps": 15.1}, "scheduler": "sarathi", "token_budget": 256},
               tmp_path / "b.png")
    (fig,) = drawn
    check_figure(fig)
    assert all(any(ln.get_label().startswith("predicted λ*") for ln in ax.get_lines()) for ax in fig.axes)


def test_the_cluster_figure(capsys, tmp_path, drawn):
    code = main(["cluster", "simulate", "pool-jsq", "--set", "run.horizon_s=60", "--plot", str(tmp_path / "c.png")])
    assert code == 0, capsys.readouterr().err
    (fig,) = drawn
    check_figure(fig)
    assert len([ln for ln in fig.axes[0].get_lines()]) >= 2     # a line per replica
