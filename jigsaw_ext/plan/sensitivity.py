"""Which assumption decides the answer: every unmeasured figure of the cost model halved and doubled,
one at a time, and what each planned row's MFU and weak-scaling efficiency (and the best layout)
become. Fractions of a peak (GEMM and elementwise efficiency) are capped at 1 when doubled."""

from __future__ import annotations

from .cost import Estimate
from .hardware import Hardware
from .search import Constraints, Planner

FACTORS = (0.5, 2.0)
FIGURES = (
    "latency intra",
    "latency inter",
    "bandwidth intra",
    "bandwidth inter",
    "overlap rule",
    "GEMM efficiency",
    "elementwise efficiency",
)


def _tier(tier, alpha: float = 1.0, bandwidth: float = 1.0):
    return tier.model_copy(
        update={
            "alpha_s": tier.alpha_s * alpha,
            "call_s": tier.call_s * alpha,
            "bus_GBps": {k: v * bandwidth for k, v in tier.bus_GBps.items()},
        }
    )


def varied(hw: Hardware, figure: str, factor: float) -> Hardware:
    """The profile with one figure scaled by `factor` (not re-validated: a what-if)."""
    if figure == "latency intra":
        update = {"intra": _tier(hw.intra, alpha=factor)}
    elif figure == "latency inter":
        update = {"inter": _tier(hw.inter, alpha=factor)}
    elif figure == "bandwidth intra":
        update = {"intra": _tier(hw.intra, bandwidth=factor)}
    elif figure == "bandwidth inter":
        update = {"inter": _tier(hw.inter, bandwidth=factor)}
    elif figure == "GEMM efficiency":
        points = [p.model_copy(update={"tflops": min(p.tflops * factor, hw.peak(p.mode))}) for p in hw.gemm]
        update = {"gemm_efficiency": min(1.0, hw.gemm_efficiency * factor), "gemm": points}
    elif figure == "elementwise efficiency":
        update = {"elementwise_efficiency": min(1.0, hw.elementwise_efficiency * factor)}
    else:
        raise ValueError(f"unknown figure {figure!r}; figures: {', '.join(FIGURES)}")
    return hw.updated(update)


def sensitivity(planner: Planner, rows: list[Estimate], limits: Constraints | None = None) -> dict:
    """{figure: {"x0.5"|"x2": {"rows": [{mesh, mfu, efficiency, step_s}], "best": mesh}}} for `rows`
    (estimates of one world size and global batch, from `planner`)."""
    limits = limits if limits is not None else Constraints()
    world, batch = rows[0].candidate.world, rows[0].candidate.global_batch
    out: dict[str, dict] = {}
    for figure in FIGURES:
        out[figure] = {}
        for factor in FACTORS:
            other = (
                planner.variant(overlap=planner.settings.overlap * factor)
                if figure == "overlap rule"
                else planner.variant(hw=varied(planner.hw, figure, factor))
            )
            moved = []
            for e in rows:
                est = other.estimate(e.candidate)
                moved.append(
                    {
                        "mesh": e.candidate.mesh,
                        "step_s": est.step_s,
                        "mfu": est.mfu,
                        "efficiency": other.efficiency(est, limits),
                    }
                )
            ranked = other.rank(world, batch, limits)
            out[figure][f"x{factor:g}"] = {"rows": moved, "best": _label(ranked[0]) if ranked else None}
    return out


def _label(e: Estimate) -> str:
    c = e.candidate
    return f"{c.mesh} ZeRO-{c.zero} mb{c.micro_batch}" + (f" rep {'+'.join(c.replicate)}" if c.replicate else "")


def sensitivity_table(rows: list[Estimate], result: dict) -> str:
    """One line per figure and factor: each row's MFU / efficiency, and the best layout then."""
    width = 17
    head = (
        f"{'figure':<24}{'x':>5}  "
        + "".join(f"{f'#{i} ' + e.candidate.mesh:>{width}}" for i, e in enumerate(rows, 1))
        + "  best layout"
    )
    base = f"{'as profiled':<24}{'':>5}  " + "".join(f"{_cell(e.mfu, e.efficiency):>{width}}" for e in rows)
    lines = [head, base]
    for figure, by_factor in result.items():
        for factor, res in by_factor.items():
            cells = "".join(f"{_cell(r['mfu'], r['efficiency']):>{width}}" for r in res["rows"])
            lines.append(f"{figure:<24}{factor:>5}  {cells}  {res['best']}")
    return "\n".join(lines)


def _cell(mfu: float, eff: float | None) -> str:
    return f"{100 * mfu:.1f}% / " + ("-" if eff is None else f"{100 * eff:.0f}%")
