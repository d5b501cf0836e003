"""Results as data: the machine-readable result of one evaluation or benchmark of a run.

:mod:`ponder.results.schema` holds the result type (schema 1), writing and reading it, and the helpers
that build one from per-sample records or a benchmark; :mod:`ponder.results.protocols` turns the
built-in protocols' reports into results (what ``ponder eval`` saves). ``ponder report`` renders them.
"""

from ponder.results.protocols import result_from_report
from ponder.results.schema import (MACS_UNIT, SCHEMA, EvalResult, Evaluation, Latency, OperatingPoint, Provenance,
                                   ResultError, RunInfo, bench_kind, config_hash, dense_macs_of, latency_from_bench,
                                   load_result, load_results, machine_info, model_family, new_result,
                                   point_from_records, result_from_bench, result_from_records, result_kind,
                                   results_dir, run_info, save_result)

__all__ = [
    "MACS_UNIT", "SCHEMA", "EvalResult", "Evaluation", "Latency", "OperatingPoint", "Provenance", "ResultError",
    "RunInfo", "bench_kind", "config_hash", "dense_macs_of", "latency_from_bench", "load_result", "load_results",
    "machine_info", "model_family", "new_result", "point_from_records", "result_from_bench", "result_from_records",
    "result_from_report", "result_kind", "results_dir", "run_info", "save_result",
]
