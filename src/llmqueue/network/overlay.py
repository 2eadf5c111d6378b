"""The fluid path next to a simulated run (docs/network.md, "Fluid model"): the fluid model of
:mod:`llmqueue.network.fluid` started from the run's own backlog at a time t0, its network backlog
(tokens still to compute) against the simulated one, and the peaks of a run's backlog waves.

The state at t0 is read off the run: each visit admitted at an engine and not finished is fluid in
its (class, hop) prefill buffer before its first token, in its decode buffer after it (shared among
the hop's round-counter states in proportion to their expected visits).  Jobs inside delay stations
are left out.  The drawing is ``network simulate --plot`` (llmqueue.cli.network), as the core
imports no plotting.
"""

from __future__ import annotations


import numpy as np

from llmqueue.network.fluid import FluidModel, FluidPath, fluid_model, fluid_path


def run_state(result, model: FluidModel, t0: float) -> np.ndarray:
    """Visits in each fluid buffer of ``model`` at time t0 of the run."""
    net, a = result.network, result.analysis
    here = (result.arrival_time <= t0) & ~(result.finish_time <= t0) & ~result.rejected
    started = result.first_token_time <= t0
    x = np.zeros(len(model.names))
    index = {n: i for i, n in enumerate(model.names)}
    for k, cls in enumerate(net.classes):
        states = net.routes[k].states
        sv = a.classes[k].state_visits
        for h in cls.hops:
            if not h.is_engine:
                continue
            mine = here & (result.sub_class == k) & (result.sub_hop == h.index)
            if not mine.any():
                continue
            counts = {"prefill": int((mine & ~started).sum()), "decode": int((mine & started).sum())}
            s_idx = [s for s, (hh, _) in enumerate(states) if hh == h.index]
            weights = np.asarray([sv[s] for s in s_idx], dtype=float)
            weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(s_idx), 1 / len(s_idx))
            for s, w in zip(s_idx, weights):
                _, counters = states[s]
                label = f"{cls.name}.{h.id}" + ("" if not counters else "[" + ",".join(
                    f"{cls.hops[lh].id}:{r}" for lh, r in counters) + "]")
                for phase, n in counts.items():
                    b = index.get(f"{label}.{phase}", index.get(f"{label}.prefill"))
                    if b is not None:
                        x[b] += w * n
    return x


def fluid_from_run(result, t0: float | None = None) -> tuple[FluidModel, FluidPath, float] | None:
    """The fluid path from the run's backlog at t0 (default: where the run's network backlog is first at
    a quarter of its peak, at least 5 % into the run) to its end; None where the fluid model does not
    apply (:class:`~llmqueue.network.fluid.NotFluid`)."""
    from llmqueue.network.fluid import NotFluid
    from llmqueue.network.metrics import network_timeseries

    try:
        model = fluid_model(result.network, result.analysis)
    except NotFluid:
        return None
    if t0 is None:
        ts = network_timeseries(result)
        t, b = ts["time_s"], ts["total_backlog_tokens"]
        late = t >= 0.05 * result.end_time
        hit = np.flatnonzero(late & (b >= 0.25 * b.max()))
        t0 = float(t[hit[0]]) if len(hit) else float(0.05 * result.end_time)
    x0 = run_state(result, model, t0)
    path = fluid_path(model, x0, max_events=20_000, start=f"the run at t = {t0:g} s",
                      horizon_s=result.end_time - t0)
    return model, path, t0


def wave_peaks(series: dict[str, np.ndarray], engines: list[str], floor: float = 0.0) -> list[tuple[str, float, float]]:
    """The backlog's waves: stretches where one engine holds the larger backlog, and each wave's peak
    (engine, time, tokens) at that engine; waves below ``floor`` tokens are dropped and neighbours at
    the same engine merged.  In Rybko–Stolyar the work moves between the engines in such waves."""
    t = series["time_s"]
    b = np.vstack([series[f"{e}_backlog_tokens"] for e in engines])
    dom = np.argmax(b, axis=0)
    out: list[tuple[str, float, float]] = []
    start = 0
    for i in range(1, len(t) + 1):
        if i == len(t) or dom[i] != dom[start]:
            seg = b[dom[start], start:i]
            j = int(np.argmax(seg))
            peak = (engines[dom[start]], float(t[start + j]), float(seg[j]))
            if peak[2] >= floor:
                if out and out[-1][0] == peak[0]:
                    out[-1] = max(out[-1], peak, key=lambda p: p[2])
                else:
                    out.append(peak)
            start = i
    return out
