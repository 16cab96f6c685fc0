"""What the data contract's modules share: batch keys, list limits, the contract error."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from imgcls.errors import ImgclsError

MAX_EXAMPLES = 10  # example paths per failed expectation (the "up to ten")
MAX_LISTED = 1000  # entries per report list; the counts are always complete
KEYS = {
    "manifest": "path",
    "images": "path",
    "classes": "label",
    "labels": "path",
    "sha256": "sha256",
    "near_duplicates": "cluster",
    "merged_groups": "group",
}
LARGEST_SHOWN = 10  # largest merged groups listed (and drawn) in the reports


class DataContractError(ImgclsError):
    """The manifest cannot be validated at all (not a table, wrong types)."""


def as_text(value: Any) -> str:
    """A cell as text; nulls become the empty string."""
    return (
        ""
        if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))
        else str(value)
    )
