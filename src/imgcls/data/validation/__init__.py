"""The data contract: a great-expectations suite over the manifest, plus image-aware grouping.

One job per module: :mod:`.frames` (the frames the suite runs on, duplicates merged),
:mod:`.rules` (the expectations, from params), :mod:`.gx_runner` (the only module importing
great_expectations), :mod:`.outcomes` (results as records), :mod:`.report` and
:mod:`.markdown` (the reports), :mod:`.contract` (the entry point) and :mod:`.run` (the
validate stage).
"""

from imgcls.data.validation.common import DataContractError
from imgcls.data.validation.contract import ValidationResult, validate_manifest
from imgcls.data.validation.markdown import merged_group_strips, render_markdown
from imgcls.data.validation.run import ValidatePaths, run_validate

__all__ = [
    "DataContractError",
    "ValidatePaths",
    "ValidationResult",
    "merged_group_strips",
    "render_markdown",
    "run_validate",
    "validate_manifest",
]
