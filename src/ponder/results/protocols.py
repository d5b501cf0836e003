"""The built-in protocols' JSON reports as :class:`ponder.results.EvalResult` (what ``evaluate_run`` saves).

Reads the keys the protocols return today: ``accuracy`` / ``macs_mean`` / ``macs_std`` / ``n``
(``standard``, ``skip``, ``spatial``), the blocks' open rates (``per_block`` of ``skip``, ``block_usage`` of
``standard``), ``dense_macs`` and ``input_size`` where given, ``sweep``
(``skip``: one point per keep threshold), ``exits`` (``anytime``: one point per exit, the headline
is the last exit), ``points`` / ``target_macs`` (``budgeted``: one point per ratio ``q`` of
the p-grid and per target budget; no headline) and ``points`` (``budget``: one point per target MACs,
named by the knob value it set; no headline); ``split`` when the numbers are not the test set's.
A protocol that builds its result itself
(:func:`ponder.results.result_from_records`) needs none of this.
"""

from __future__ import annotations

import math
from typing import Any

from ponder.cost import format_count
from ponder.evaluate.protocols import EvalContext
from ponder.results.schema import EvalResult, OperatingPoint, new_result, result_kind


def result_from_report(ctx: EvalContext, protocol: str, report: dict[str, Any]) -> EvalResult:
    """The :class:`EvalResult` of ``protocol``'s ``report`` for the run of ``ctx``."""
    points: list[OperatingPoint] = []
    head: dict[str, Any] = {k: report.get(k) for k in ("accuracy", "macs_mean", "macs_std")}
    images = report.get("n", report.get("num_test", 0))
    for p in report.get("sweep") or []:
        points.append(OperatingPoint(label=f"threshold {p['threshold']:g}", macs_mean=p["macs_mean"],
                                     accuracy=p["accuracy"], macs_std=p["macs_std"], knob="threshold",
                                     value=p["threshold"]))
    for e in report.get("exits") or []:
        points.append(OperatingPoint(label=f"exit {e['exit']}", macs_mean=float(e["macs"]), accuracy=e["top1"] / 100,
                                     macs_std=0.0, knob="exit", value=e["exit"]))
    if report.get("exits"):
        last = points[-1]
        head = {"accuracy": last.accuracy, "macs_mean": last.macs_mean, "macs_std": 0.0}
    costs = report.get("exit_macs")
    for p in report.get("points") or []:
        if "q" not in p:  # ``budget``: one point per target, at the knob set_budget chose; named by the
            # target (the same over seeds), or by the knob's value where the points are its discrete choices
            knob, value = report.get("knob"), p.get("knob")
            by_choice = report.get("points_by") == "choice" and knob and isinstance(value, (int, float))
            label = f"{knob} {value:g}" if by_choice else f"budget {format_count(p['target_macs'])}"
            points.append(OperatingPoint(label=label, macs_mean=p["macs_mean"], accuracy=p["accuracy"],
                                         macs_std=p.get("macs_std"), knob=knob,
                                         value=value if isinstance(value, (int, float)) else None,
                                         budget=p["target_macs"]))
            continue
        points.append(OperatingPoint(label=f"q={p['q']:g}", macs_mean=p["expected_macs"], accuracy=p["accuracy"] / 100,
                                     macs_std=_std_of_counts(p.get("exit_counts"), costs), knob="q", value=p["q"]))
    for t in report.get("target_macs") or []:
        points.append(OperatingPoint(label=f"budget {format_count(t['target_macs'])}", macs_mean=t["expected_macs"],
                                     accuracy=t["accuracy"] / 100, budget=t["target_macs"]))
    size = report.get("input_size")
    usage = report.get("per_block", report.get("block_usage"))
    return new_result(ctx.run_dir, ctx.config, ctx.model, kind=result_kind(protocol, ctx.options), protocol=protocol,
                      images=images, points=points, dense_macs=report.get("dense_macs"), input_size=size,
                      split=report.get("split", "test"), options=ctx.options, device=ctx.device, block_usage=usage,
                      **head)


def _std_of_counts(counts: list[int] | None, costs: list[float] | None) -> float | None:
    """Population std of per-image MACs when ``counts[k]`` images took exit ``k`` costing ``costs[k]``."""
    if not counts or not costs or sum(counts) == 0:
        return None
    n = sum(counts)
    mean = sum(c * m for c, m in zip(counts, costs)) / n
    return math.sqrt(sum(c * (m - mean) ** 2 for c, m in zip(counts, costs)) / n)
