"""Running the rules with great_expectations: the only module that imports it.

It is imported lazily, inside functions, so that importing :mod:`imgcls` stays fast. The suite
runs with an ephemeral context: no project folder, no Data Docs, no network.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pandas as pd

from imgcls.data.validation.common import KEYS, MAX_EXAMPLES
from imgcls.data.validation.rules import Check


def gx_version() -> str:
    """The great_expectations version (recorded in the report)."""
    import great_expectations as gx

    return str(gx.__version__)


def _ephemeral_context() -> Any:
    """A GX context that lives in memory only: no files, no Data Docs, no progress bars."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # never phone home
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX pins this one logger to INFO at import ("Created temporary directory ..." on every
    # run); let it inherit from `great_expectations` again so the application decides.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.NOTSET)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def run_suite(
    tables: dict[str, pd.DataFrame], checks: list[Check]
) -> list[tuple[Check, dict[str, Any], int]]:
    """Validate each frame against its checks: (check, GX result JSON, rows) per check, in order."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    context = _ephemeral_context()
    source = context.data_sources.add_pandas("imgcls")
    results: list[tuple[Check, dict[str, Any], int]] = []
    for batch_name in dict.fromkeys(c.batch for c in checks):
        mine = [c for c in checks if c.batch == batch_name]
        table = tables[batch_name]
        suite = gx.ExpectationSuite(name=f"imgcls_{batch_name}")
        built = [getattr(gxe, c.expectation.name)(**c.expectation.kwargs) for c in mine]
        for expectation in built:
            suite.add_expectation(expectation)
        asset = source.add_dataframe_asset(batch_name)
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": table}
        )
        result = batch.validate(suite, result_format=_result_format(batch_name, table.columns))
        for check, res in zip(mine, _ordered(result.results, built), strict=True):
            results.append((check, res.to_json_dict(), len(table)))
    return results


def _ordered(results: list[Any], expectations: list[Any]) -> list[Any]:
    """Results in the order of `expectations`: GX reorders them, and unsaved suites carry no ids."""
    by_key = {_config_key(r.expectation_config.to_json_dict()): r for r in results}
    return [by_key[_config_key(e.configuration.to_json_dict())] for e in expectations]


def _config_key(config: dict[str, Any]) -> str:
    """Identity of an expectation within one suite: type, arguments (minus batch) and severity."""
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    return json.dumps([config["type"], kwargs, str(config.get("severity"))], sort_keys=True)


def _result_format(batch_name: str, columns: pd.Index) -> dict[str, Any]:
    """Row frames: a few example rows by path; small derived frames: every unexpected key."""
    key = KEYS[batch_name]
    if key not in columns:
        return {"result_format": "SUMMARY"}  # only column-presence checks run then
    if key == "path":
        return {
            "result_format": "SUMMARY",
            "unexpected_index_column_names": [key],
            "partial_unexpected_count": MAX_EXAMPLES,
        }
    return {"result_format": "COMPLETE", "unexpected_index_column_names": [key]}
