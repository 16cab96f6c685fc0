"""The contract's rules, built from the `validate` params: which expectation on which frame.

Rules are plain data (an expectation class name and its arguments, words for people); the GX
runner (:mod:`imgcls.data.validation.gx_runner`) turns them into great_expectations objects, so
that module stays the only one importing great_expectations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imgcls.data.phash import PHASH_RE
from imgcls.data.schema import MANIFEST_COLUMNS
from imgcls.task import LABEL_SEP

if TYPE_CHECKING:
    from imgcls.config import ValidateConfig
    from imgcls.data.validation.frames import Frames

_NOT_NULL_ALL = ("path", "label", "group", "sha256")  # required even for undecodable files
_NOT_NULL_IMAGES = ("width", "height", "mode", "format", "phash")  # required once decoded
_SOURCE_SPLITS = ("train", "val", "test")
_SHA256_RE = r"^[0-9a-f]{64}$"
# A multi-label cell: non-empty labels joined by "|" (ingest also sorts them and drops repeats).
_LABEL_SET_RE = r"^[^|]+(?:\|[^|]+)*$"


@dataclass(frozen=True)
class Expect:
    """One great_expectations expectation as data: its class name and keyword arguments."""

    name: str  # e.g. "ExpectColumnValuesToBeBetween"
    kwargs: dict[str, Any]


def expect(name: str, **kwargs: Any) -> Expect:
    """An :class:`Expect` for `name` with these arguments."""
    return Expect(name, kwargs)


@dataclass(frozen=True)
class Check:
    """One expectation, the frame it runs on, and words for people."""

    batch: str  # key of Frames.tables
    expectation: Expect  # built into a great_expectations Expectation by the runner
    title: str  # the rule in plain words
    hint: str  # how to fix a failure


def build_checks(cfg: ValidateConfig, frames: Frames, missing: list[str]) -> list[Check]:
    """The suite, built from params: structure first, then images, classes and duplicates."""
    checks = [
        Check(
            "manifest",
            expect("ExpectColumnToExist", column=col),
            f"column `{col}` is present",
            "rebuild the manifest with `dvc repro ingest` (it writes every contract column)",
        )
        for col in MANIFEST_COLUMNS
    ]
    if missing:
        return checks  # every other rule needs these columns; more failures would be noise
    checks += [
        Check(
            "manifest",
            expect("ExpectColumnValuesToNotBeNull", column=col),
            f"`{col}` is filled in for every row",
            "rebuild the manifest with `dvc repro ingest`",
        )
        for col in _NOT_NULL_ALL
    ]
    checks += [
        Check(
            "manifest",
            expect("ExpectColumnValuesToBeUnique", column="path"),
            "each file is listed once",
            "rebuild the manifest; two sources may point at the same files",
        ),
        Check(
            "manifest",
            expect("ExpectColumnValuesToMatchRegex", column="sha256", regex=_SHA256_RE),
            "`sha256` is a 64-char lowercase hex digest",
            "rebuild the manifest with `dvc repro ingest`",
        ),
        Check(
            "manifest",
            expect(
                "ExpectColumnValuesToBeInSet", column="source_split", value_set=list(_SOURCE_SPLITS)
            ),
            "`source_split` is train, val, test or empty",
            "fix the source's split names or its `split:` setting under `data.source`",
        ),
        Check(
            "manifest",
            # mostly = 1 - fraction: a few undecodable files are quarantined, more stop the run;
            # the tiny epsilon keeps an exact-threshold fraction on the passing side of float error
            expect(
                "ExpectColumnValuesToBeNull",
                column="error",
                mostly=max(0.0, 1.0 - cfg.max_quarantine_fraction - 1e-12),
            ),
            f"at most {cfg.max_quarantine_fraction:.2%} of the files are undecodable "
            "(those are quarantined)",
            "remove or replace the broken files listed, or raise "
            "`validate.max_quarantine_fraction` in params.yaml",
        ),
    ]
    checks += _image_checks(cfg, frames.multi_label)
    checks += _class_checks(cfg, frames.multi_label)
    checks += [
        Check(
            "sha256",
            expect("ExpectColumnValuesToBeBetween", column="labels", max_value=1),
            "byte-identical files carry the same label",
            "delete one copy of each pair listed, or move it to the right class",
        ),
        Check(
            "images",
            expect("ExpectColumnValuesToBeUnique", column="sha256", severity="warning"),
            "no byte-identical files (duplicates with one label are kept, in one group)",
            "nothing required: duplicates share a group, so they never straddle splits",
        ),
    ]
    if cfg.near_duplicate_threshold >= 0:
        checks.append(
            Check(
                "near_duplicates",
                expect(
                    "ExpectColumnValuesToBeBetween",
                    column="labels",
                    max_value=1,
                    severity="warning",
                ),
                f"near-duplicates (pHash distance <= {cfg.near_duplicate_threshold}, "
                f"thumbnail correlation >= {cfg.near_duplicate_similarity:g}) carry the same label",
                "look at the clusters listed: a mislabelled copy, or raise "
                "`validate.near_duplicate_similarity`",
            )
        )
    checks += [
        Check(
            "merged_groups",
            expect(
                "ExpectColumnValuesToBeBetween",
                column="new_classes",
                max_value=0,
                severity="warning",
            ),
            "merging duplicates adds no class to a group (a merged group that spans classes is "
            "suspicious: a mislabelled copy, or different images taken for copies)",
            "look at the groups listed and at reports/validation_groups.png: fix the labels, or "
            "raise `validate.near_duplicate_similarity` if the images differ",
        ),
        Check(
            "merged_groups",
            expect(
                "ExpectColumnValuesToBeBetween",
                column="class_share",
                max_value=cfg.max_merged_group_share,
                severity="warning",
            ),
            f"no merged group holds more than {cfg.max_merged_group_share:.0%} of a class "
            "(a large merged group moves that share of the class into one split)",
            "look at the groups listed: true copies are fine (delete spares to rebalance); "
            "otherwise raise `validate.near_duplicate_similarity` or use finer `data.group` rules",
        ),
    ]
    return checks


def _image_checks(cfg: ValidateConfig, multi_label: bool = False) -> list[Check]:
    """Checks on decoded images: filled-in properties, sizes, modes, labels."""
    checks = [
        Check(
            "images",
            expect("ExpectColumnValuesToNotBeNull", column=col),
            f"`{col}` is filled in for every decodable image",
            "rebuild the manifest with `dvc repro ingest`",
        )
        for col in _NOT_NULL_IMAGES
    ]
    checks += [
        Check(
            "images",
            expect(
                "ExpectColumnValuesToBeBetween",
                column="width",
                min_value=cfg.min_width,
                max_value=cfg.max_width,
            ),
            f"image width within [{cfg.min_width}, {cfg.max_width}] px",
            "remove or resize the images listed, or change `validate.min_width` / `max_width`",
        ),
        Check(
            "images",
            expect(
                "ExpectColumnValuesToBeBetween",
                column="height",
                min_value=cfg.min_height,
                max_value=cfg.max_height,
            ),
            f"image height within [{cfg.min_height}, {cfg.max_height}] px",
            "remove or resize the images listed, or change `validate.min_height` / `max_height`",
        ),
        Check(
            "images",
            expect("ExpectColumnValuesToBeInSet", column="mode", value_set=list(cfg.allowed_modes)),
            f"colour mode in {', '.join(cfg.allowed_modes)}",
            "convert the images listed, or add their mode to `validate.allowed_modes`",
        ),
        Check(
            "images",
            expect("ExpectColumnValuesToMatchRegex", column="phash", regex=PHASH_RE),
            "`phash` is a 16-char lowercase hex 64-bit perceptual hash",
            "rebuild the manifest with `dvc repro ingest`",
        ),
    ]
    if multi_label:
        return checks + _label_set_checks(cfg)
    if cfg.classes:
        checks.append(
            Check(
                "images",
                expect("ExpectColumnValuesToBeInSet", column="label", value_set=list(cfg.classes)),
                f"labels within the configured classes ({', '.join(cfg.classes)})",
                "fix the folders / labels listed, or add the class to `validate.classes`",
            )
        )
    checks.append(
        Check(
            "images",
            expect(
                "ExpectColumnUniqueValueCountToBeBetween", column="label", min_value=cfg.min_classes
            ),
            f"at least {cfg.min_classes} classes",
            "add images of more classes (one folder per class), or lower `validate.min_classes`",
        )
    )
    return checks


def _label_set_checks(cfg: ValidateConfig) -> list[Check]:
    """Multi-label: well-formed label sets; configured / minimum classes over single labels."""
    checks = [
        Check(
            "images",
            expect("ExpectColumnValuesToMatchRegex", column="label", regex=_LABEL_SET_RE),
            f"each label set is non-empty labels joined by '{LABEL_SEP}'",
            "rebuild the manifest with `dvc repro ingest` (it writes every set sorted and joined "
            f"by '{LABEL_SEP}'); in a labels CSV, set data.label_separator to the one you use",
        )
    ]
    if cfg.classes:
        checks.append(
            Check(
                "labels",
                expect("ExpectColumnValuesToBeInSet", column="label", value_set=list(cfg.classes)),
                f"every label within the configured classes ({', '.join(cfg.classes)})",
                "fix the labels listed in the labels CSV, or add them to `validate.classes`",
            )
        )
    checks.append(
        Check(
            "labels",
            expect(
                "ExpectColumnUniqueValueCountToBeBetween", column="label", min_value=cfg.min_classes
            ),
            f"at least {cfg.min_classes} distinct labels",
            "add images with more labels, or lower `validate.min_classes`",
        )
    )
    return checks


def _class_checks(cfg: ValidateConfig, multi_label: bool = False) -> list[Check]:
    """Checks on per-class counts (per individual label for multi-label): size and imbalance."""
    if multi_label:
        noun, fix = "label", "add images carrying the labels listed"
        small = "add images carrying the rarest labels"
    else:
        noun, fix, small = (
            "class",
            "add images to the classes listed",
            "add images to the small classes",
        )
    return [
        Check(
            "classes",
            expect(
                "ExpectColumnValuesToBeBetween", column="images", min_value=cfg.min_images_per_class
            ),
            f"at least {cfg.min_images_per_class} images per {noun}",
            f"{fix}, or lower `validate.min_images_per_class`",
        ),
        Check(
            "classes",
            expect("ExpectColumnMaxToBeBetween", column="ratio", max_value=cfg.max_imbalance_ratio),
            f"{noun} imbalance (largest / smallest {noun}) at most {cfg.max_imbalance_ratio:g}",
            f"{small}, or raise `validate.max_imbalance_ratio`",
        ),
    ]
