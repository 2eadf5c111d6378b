"""The closed forms of routing theory that the report's cluster section checks the simulator
against (llmqueue.cluster.capacity): Pollaczek–Khinchine's M/G/1 and Mitzenmacher's supermarket
limit, and one short simulated pool against each."""

from __future__ import annotations

import math

import pytest

from llmqueue.cluster import parse_cluster, run_pool
from llmqueue.cluster.capacity import mg1_sojourn, supermarket_sojourn
from llmqueue.reproduce import figures
from llmqueue.reproduce.sections import UNBATCHED_POOL, _service_moments
from tests.test_plots import check_figure, drawn  # noqa: F401  (drawn: the fixture that keeps figures)


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.7, 0.9, 0.99])
def test_the_closed_forms_meet_mm1_where_they_should(rho):
    assert mg1_sojourn(rho, 1.0) == pytest.approx(1 / (1 - rho), rel=1e-12)        # exponential service: M/M/1
    assert mg1_sojourn(rho, 0.0) == pytest.approx(1 + rho / (2 * (1 - rho)), rel=1e-12)   # M/D/1
    assert supermarket_sojourn(rho, 1) == pytest.approx(1 / (1 - rho), rel=1e-12)    # d = 1: random
    assert 1.0 <= supermarket_sojourn(rho, 3) <= supermarket_sojourn(rho, 2) <= 1 / (1 - rho)


def test_the_supermarket_limit_of_two_choices():
    # Σ_{i≥1} ρ^(2^i − 2) = 1 + 0.81 + 0.9^6 + 0.9^14 + ... = 2.6141 at ρ = 0.9
    assert supermarket_sojourn(0.9, 2) == pytest.approx(sum(0.9 ** (2 ** i - 2) for i in range(1, 30)), rel=1e-12)
    assert supermarket_sojourn(0.9, 2) == pytest.approx(2.6141, abs=1e-4)
    assert math.isinf(supermarket_sojourn(1.0)) and math.isinf(mg1_sojourn(1.2, 0.5))


def test_the_unbatched_pool_is_what_the_closed_forms_describe():
    # 16 replicas serving one request at a time, ρ = 0.7, 200 s: random within 10 % of M/G/1,
    # power of two within 15 % of the supermarket limit
    mean_service, cv2 = _service_moments()
    assert mean_service == pytest.approx(10.0, rel=0.01) and cv2 == pytest.approx(0.72, rel=0.02)
    got = {}
    for router in ("random", "power-of-d"):
        data = {**UNBATCHED_POOL, "workload": {**UNBATCHED_POOL["workload"], "load": 0.7},
                "cluster": {"replicas": 16, "router": router}, "run": {"horizon_s": 200.0, "seed": 0}}
        got[router] = run_pool(parse_cluster(data)).summary["pool"]["e2e_s"]["mean"] / (0.01 * mean_service)
    assert got["random"] == pytest.approx(mg1_sojourn(0.7, cv2), rel=0.10)
    assert got["power-of-d"] == pytest.approx(supermarket_sojourn(0.7, 2), rel=0.15)


def test_the_reports_router_figure(tmp_path, drawn):  # noqa: F811
    points = {x: {"random": mg1_sojourn(x, 0.72), "power_of_two": supermarket_sojourn(x), "jsq": 1.0 + x / 4,
                  "mg1": mg1_sojourn(x, 0.72), "supermarket": supermarket_sojourn(x)} for x in (0.5, 0.7, 0.9)}
    figures.routers(points, tmp_path / "r.png")
    check_figure(drawn[0])
    lines = drawn[0].axes[0].get_lines()
    assert [ln.get_label() for ln in lines][:3] == ["random", "power of two", "JSQ"]
    assert lines[0].get_color() == lines[3].get_color() and lines[1].get_color() == lines[4].get_color()
