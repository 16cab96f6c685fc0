"""Typed, strict parameters: one pydantic model per `params.yaml` section.

Every model forbids unknown keys, so a typo in `params.yaml` fails loudly with the section and
key named instead of silently falling back to a default. The library never reads `params.yaml`
itself: stage entry points call :func:`load_params` and pass the sections they need.
Long because it is the whole params schema, one model per section, in one place.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A params file that is missing, unreadable or does not match the schema."""


class Strict(BaseModel):
    """Base for every params section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- base


class BaseSection(Strict):
    """Settings shared by all stages."""

    seed: int = 42


# --------------------------------------------------------------------------- data (ingest)


class GroupConfig(Strict):
    """How images are grouped so that a group never straddles two splits."""

    by: Literal["none", "regex", "parent_dir", "csv", "near_duplicate"] = "none"
    # `regex`: applied to the file name with re.search; the capturing group(s) form the group id
    # (several groups are concatenated). A name the pattern does not match is its own group.
    pattern: str | None = None
    level: int = Field(1, ge=1)  # `parent_dir`: 1 = the file's own folder, 2 = its parent, ...
    column: str = "group"  # `csv`: column of the labels CSV that holds the group

    @model_validator(mode="after")
    def _pattern_for_regex(self) -> GroupConfig:
        if self.by == "regex":
            if not self.pattern:
                raise ValueError("data.group.by is 'regex' but data.group.pattern is empty")
            try:
                compiled = re.compile(self.pattern)
            except re.error as err:
                raise ValueError(
                    f"data.group.pattern {self.pattern!r} is not a regex: {err}"
                ) from None
            if compiled.groups < 1:
                raise ValueError(
                    f"data.group.pattern {self.pattern!r} has no capturing group: wrap the part "
                    "of the file name that identifies the group in ( ), e.g. '^([a-z]+\\d+)-'"
                )
        return self


SHA256_RE = r"[0-9a-fA-F]{64}"


class ShardRef(Strict):
    """One tar shard of a `shards` source: a local `path` or an https `url` with its `sha256`."""

    path: str | None = None  # a .tar file (relative to the repo root)
    url: str | None = None  # https URL of a .tar file
    sha256: str | None = None  # expected digest of the downloaded shard

    @model_validator(mode="after")
    def _one_place(self) -> ShardRef:
        if bool(self.path) == bool(self.url):
            raise ValueError("a shard in data.source.shards needs exactly one of `path` or `url`")
        if self.sha256 is not None and not re.fullmatch(SHA256_RE, self.sha256):
            raise ValueError(f"sha256 {self.sha256!r} is not 64 hex characters")
        return self


class SourceSpec(Strict):
    """One data source in long form (the short form is a plain string: preset, path or URL)."""

    kind: Literal[
        "auto", "folder", "archive", "url", "digits", "idx", "csv", "preset", "shards"
    ] = "auto"
    path: str | None = None  # folder, archive, IDX directory or labels CSV (relative to repo root)
    url: str | None = None  # https URL of an archive
    sha256: str | None = None  # expected digest of the downloaded archive
    name: str | None = None  # folder name under data/raw/ (default: derived from path / url)
    split: Literal["train", "val", "test"] | None = None  # force `source_split` for every row
    root: str | None = None  # CSV sources: folder that the CSV's paths are relative to
    preset: str | None = None  # `preset`: rps | fashion-mnist (same as the short form)
    classes: list[str] | None = None  # `idx`: class names for label indices 0, 1, ...
    group: GroupConfig | None = None  # this source only: overrides `data.group`
    # `shards` (tar shards in the WebDataset layout, read in place; docs/data-sources.md): a
    # list of shard files or URLs, instead of `path` (a folder of *.tar, or one .tar) or `url`
    shards: list[str | ShardRef] | None = None
    labels: str | None = None  # `shards`: CSV `key,label[,group][,split]` instead of <key>.cls

    @model_validator(mode="after")
    def _fields_for_kind(self) -> SourceSpec:
        needs = {"folder": "path", "archive": "path", "csv": "path", "url": "url"}
        field = needs.get(self.kind)
        if field and not getattr(self, field):
            raise ValueError(f"a data.source of kind '{self.kind}' needs `{field}`")
        if self.kind == "shards" and sum(map(bool, (self.path, self.url, self.shards))) != 1:
            raise ValueError(
                "a data.source of kind 'shards' needs one of `path` (a folder of .tar shards, or "
                "one .tar), `url` (+ `sha256`) or `shards` (a list of paths or {url, sha256})"
            )
        if self.kind not in ("shards", "auto") and (self.shards or self.labels):
            raise ValueError("`shards` and `labels` belong to a data.source of kind 'shards'")
        if self.kind == "idx" and not self.path and not self.url:
            raise ValueError("a data.source of kind 'idx' needs `path` (the folder of IDX files)")
        if self.kind == "auto" and not (self.path or self.url or self.preset or self.shards):
            raise ValueError("a data.source needs one of `path`, `url` or `preset` (or a `kind`)")
        if self.sha256 is not None and not re.fullmatch(SHA256_RE, self.sha256):
            raise ValueError(f"sha256 {self.sha256!r} is not 64 hex characters")
        if self.name is not None and (
            not self.name or "/" in self.name or "\\" in self.name or self.name.startswith(".")
        ):
            raise ValueError(
                f"name {self.name!r} must be a plain folder name (no '/', no dot first)"
            )
        return self


class DataConfig(Strict):
    """`data` section: what `ingest` reads and how it groups images."""

    source: str | SourceSpec | list[str | SourceSpec] = "digits"
    group: GroupConfig = GroupConfig()
    extensions: list[str] = [".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"]
    max_archive_bytes: int = Field(4 * 1024**3, gt=0)  # refuse archives that unpack larger
    max_download_bytes: int = Field(4 * 1024**3, gt=0)  # stop downloads that grow larger
    max_image_pixels: int = Field(89_478_485, gt=0)  # Pillow's decompression-bomb limit
    workers: int = Field(0, ge=0)  # 0 = one per CPU core
    # Multi-label data (docs/multi-label.md): a labels CSV's `label` cell holds several labels
    # joined by `label_separator`; ingest stores them sorted and joined by "|".
    multi_label: bool = False
    label_separator: str = Field("|", min_length=1)


# --------------------------------------------------------------------------- validate


class ValidateConfig(Strict):
    """`validate` section: the data contract checked by great-expectations."""

    classes: list[str] | None = None  # expected label set; None = accept what is found
    min_classes: int = Field(2, ge=2)
    min_images_per_class: int = Field(10, ge=1)
    max_imbalance_ratio: float = Field(20.0, ge=1.0)
    min_width: int = Field(1, ge=1)
    max_width: int = Field(10_000, ge=1)
    min_height: int = Field(1, ge=1)
    max_height: int = Field(10_000, ge=1)
    # Every 16-bit variant the decoder rescales (imageinfo.HIGH_BIT_MODES): a big-endian TIFF
    # opens as I;16B, not I;16.
    allowed_modes: list[str] = [
        "1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"
    ]  # fmt: skip
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)
    near_duplicate_threshold: int = Field(4, ge=-1, le=64)  # pHash Hamming distance; -1 = off
    # a pHash candidate pair is a near-duplicate only if its 16x16 thumbnails correlate this much
    near_duplicate_similarity: float = Field(0.997, ge=-1.0, le=1.0)
    # ... and, for two images of one size, no 4x4 block of the 32x32 thumbnails differs more
    near_duplicate_max_detail_difference: float = Field(0.15, gt=0.0)
    # warn when merging duplicates gives one group more than this share of a class
    max_merged_group_share: float = Field(0.05, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> ValidateConfig:
        if self.min_width > self.max_width:
            raise ValueError(f"validate.min_width {self.min_width} > max_width {self.max_width}")
        if self.min_height > self.max_height:
            raise ValueError(
                f"validate.min_height {self.min_height} > max_height {self.max_height}"
            )
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("validate.classes lists a class twice")
        return self


# --------------------------------------------------------------------------- split


class SplitConfig(Strict):
    """`split` section: group-stratified train / val / test fractions."""

    train: float = Field(0.7, gt=0.0, le=1.0)  # share of each class; the model needs some
    val: float = Field(0.15, ge=0.0, le=1.0)  # 0 = no val split
    test: float = Field(0.15, ge=0.0, le=1.0)  # 0 = no test split
    stable: bool = True  # groups in the previous splits.csv keep their split as data grows
    respect_source_split: bool = True  # rows delivered as source_split=test stay in test

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.val + split.test must be 1.0, got {total:g}")
        return self


# --------------------------------------------------------------------------- model


class ModelConfig(Strict):
    """`model` section: which registered architecture to build."""

    name: str = "simple_cnn"  # a custom model (`imgcls models`) or any timm model name
    pretrained: bool = False
    pretrained_path: str | None = None  # local .safetensors / .pth weights
    kwargs: dict[str, Any] = {}  # passed to the model constructor (widths, dropout, ...)
    # Output head (docs/heads.md): softmax (one class per image), binary (one logit + BCE and a
    # decision threshold tuned on val; exactly 2 classes), multilabel (one sigmoid per label).
    # auto = multilabel when data.multi_label is true, else softmax.
    head: Literal["auto", "softmax", "binary", "multilabel"] = "auto"
    positive_class: str | None = None  # binary: the "yes" class (default: 2nd in sorted order)
    # Test-time augmentation, built into the model file (evaluate, predict, serving, exports):
    # hflip averages the logits of each image and its mirror image. Only where a mirror keeps
    # the label (clothes, hands; not digits or text); it doubles the cost of a prediction.
    # hflip_shift adds both views shifted one pixel diagonally each way (6 passes in all).
    tta: Literal["none", "hflip", "hflip_shift"] = "none"


# --------------------------------------------------------------------------- augment


class TransformSpec(BaseModel):
    """One albumentations transform: `name` plus its keyword arguments."""

    model_config = ConfigDict(extra="allow")  # the arguments are the transform's own

    name: str


class AugmentConfig(Strict):
    """`augment` section: albumentations pipelines as data."""

    train: list[TransformSpec] = []
    eval: list[TransformSpec] = []


# --------------------------------------------------------------------------- train


class ProgressiveResize(Strict):
    """`train.progressive_resize`: early epochs at a smaller side, growing to `image_size`.

    A conv net's FLOPs grow with the pixels, so early epochs at a smaller side cost less (a 16 px
    step of Fashion-MNIST's net takes ~1/3 of a 28 px one); the last epochs, where the learning
    rate anneals, run at full size. Epoch e (0-based) of E trains at
    `start_size + (image_size - start_size) * e / F` rounded down to a multiple of `multiple`,
    where F = round(full_at * E), and at `image_size` from epoch F on (the last epoch always).
    Validation always runs at `image_size`, and by default only after full-size epochs: a net
    scored at a size it does not train at yet says little, and the monitor picks a full-size
    epoch anyway. (FFCV's and fast.ai's progressive resizing.)
    """

    start_size: int = Field(ge=4)  # side of the first epoch's batches, px
    full_at: float = Field(0.6, gt=0.0, le=1.0)  # share of the epochs before full size
    multiple: int = Field(4, ge=1)  # sides are rounded down to a multiple of this
    # true: validate after the downscaled epochs too (curves for every epoch; ~0.8 s an epoch
    # on Fashion-MNIST's 4,860 val images, 2 CPU cores)
    validate_small: bool = False


class TrainConfig(Strict):
    """`train` section: optimisation, data loading and device."""

    image_size: int = Field(32, ge=4)
    channels: Literal["auto", 1, 3] = "auto"  # auto: 1 if every image is grayscale, else 3
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD only (Nesterov)
    scheduler: Literal["cosine", "onecycle", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)
    step_size: int = Field(10, ge=1)  # `step` scheduler: epochs between decays
    gamma: float = Field(0.1, gt=0, le=1)  # `step` scheduler: decay factor
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    progressive_resize: ProgressiveResize | None = None  # smaller early epochs
    early_stopping_patience: int | None = Field(None, ge=1)
    # Metric for best-epoch selection and early stopping (loss-like ones are minimised).
    monitor: Literal[
        "val_f1_macro",
        "val_accuracy",
        "val_loss",
        "val_precision_macro",
        "val_recall_macro",
        "train_loss",
    ] = "val_f1_macro"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # auto: measured at start on a few real batches of the model (imgcls.training.probe;
    # docs/training.md): the fastest numerically safe of fp32 / bf16 (CUDA: also fp16), cached
    # per CPU / GPU and model. With `deterministic: true`, auto is not measured: bf16 on CUDA
    # (fp16 where bf16 is unsupported), fp32 elsewhere.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # NHWC memory format: true / false, or auto (measured like precision; unmeasured: on CUDA,
    # and on CPU with bf16).
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False  # torch.compile the model (CUDA: faster after a warm-up)
    # DataLoader workers when augmenting; auto: spare CPUs per process (0 on a 2-core CPU box).
    num_workers: int | Literal["auto"] = Field("auto")
    # An augment.train of only HorizontalFlip / VerticalFlip / PadIfNeeded (constant, centred) /
    # RandomCrop runs on whole batches, where the split lives (the GPU's memory on CUDA), with
    # albumentations' distributions; false: always albumentations, per image, in the DataLoader.
    batched_augment: bool = True
    deterministic: bool = False
    # CPU only: torch threads for training (None: one per core; auto: 1 or one per core,
    # whichever the start-up probe measures faster). On a CPU shared with other jobs, fewer
    # threads than cores often trains faster.
    cpu_threads: int | Literal["auto"] | None = Field(None)
    # Imbalanced classes (docs/imbalance.md). Loss weights: none, balanced (n / (k * count_c) on
    # the train split) or {class name: weight} (unnamed classes weigh 1).
    class_weights: Literal["none", "balanced"] | dict[str, float] = "none"
    # Epoch order: shuffle (each image once) or balanced (drawn with replacement, every class
    # equally likely; same epoch length).
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    # binary / multilabel heads: the metric the decision threshold(s) maximise on the val split.
    threshold_metric: Literal["f1", "f0.5", "f2", "balanced_accuracy"] = "f1"

    @model_validator(mode="after")
    def _workers(self) -> TrainConfig:
        if isinstance(self.num_workers, int) and self.num_workers < 0:
            raise ValueError("train.num_workers must be >= 0 or 'auto'")
        if isinstance(self.cpu_threads, int) and self.cpu_threads < 1:
            raise ValueError("train.cpu_threads must be >= 1, 'auto' or null (one per core)")
        pr = self.progressive_resize
        if pr is not None and pr.start_size > self.image_size:
            raise ValueError(
                f"train.progressive_resize.start_size ({pr.start_size}) is larger than "
                f"train.image_size ({self.image_size}); make it smaller or drop the section"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _class_weights(cls, data: Any) -> Any:
        # One clear message instead of pydantic's error per union member; class names may be
        # YAML numbers (digits: {3: 5.0}) but labels are strings.
        if not isinstance(data, dict) or "class_weights" not in data:
            return data
        value = data["class_weights"]
        if not isinstance(value, dict) and value not in ("none", "balanced"):
            raise ValueError(
                f"train.class_weights must be none, balanced or a mapping {{class: weight}}, "
                f"got {value!r}"
            )
        if isinstance(value, dict):
            bad = {k: v for k, v in value.items() if not _positive_number(v)}
            if bad:
                raise ValueError(
                    f"train.class_weights: weights must be numbers > 0, got {bad} "
                    "(leave a class out to keep its weight at 1)"
                )
            data = {**data, "class_weights": {str(k): float(v) for k, v in value.items()}}
        return data


def _positive_number(value: Any) -> bool:
    """True for an int / float above zero (YAML booleans are not weights)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


# --------------------------------------------------------------------------- evaluate


class EvaluateConfig(Strict):
    """`evaluate` section: what the report contains."""

    splits: list[Literal["train", "val", "test"]] = ["test", "val"]
    top_k: int = Field(3, ge=1)
    gallery_size: int = Field(16, ge=0)
    batch_size: int = Field(256, ge=1)


# --------------------------------------------------------------------------- tracking


class TrackingConfig(Strict):
    """`tracking` section: MLflow (URI and experiment; `MLFLOW_*` env vars win)."""

    enabled: bool = True
    uri: str | None = None  # None: SQLite file `mlflow.db` at the repository root
    experiment: str = "imgcls"
    log_model: bool = True
    # evaluated models become versions of this registered model, alias `challenger`; null: off
    register_model: str | None = "imgcls"
    system_metrics: bool = True  # CPU / memory / GPU utilisation sampled into each run


# --------------------------------------------------------------------------- tune


class FloatDist(Strict):
    """A float searched in [low, high], optionally on a log scale or in steps."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)


class IntDist(Strict):
    """An integer searched in [low, high], optionally on a log scale or in steps."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)


class CategoricalDist(Strict):
    """One of a list of values (numbers, strings, booleans, null)."""

    type: Literal["categorical"]
    choices: list[bool | int | float | str | None] = Field(min_length=1)


Distribution = FloatDist | IntDist | CategoricalDist
_DISTRIBUTIONS: dict[str, type[Strict]] = {
    "float": FloatDist,
    "int": IntDist,
    "categorical": CategoricalDist,
}
TUNABLE_SECTIONS = ("train", "model", "augment")


def _distribution(key: str, spec: Any) -> Distribution:
    """One `tune.space` entry, with an error that names the key, what is wrong and the fix."""
    where = f"tune.space.{key}"
    if not isinstance(spec, dict) or spec.get("type") not in _DISTRIBUTIONS:
        raise ValueError(
            f"{where}: expected a mapping with type float, int or categorical, e.g. "
            "{type: float, low: 0.0001, high: 0.01, log: true}, got " + repr(spec)
        )
    cls = _DISTRIBUTIONS[spec["type"]]
    unknown = sorted(set(spec) - set(cls.model_fields))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown} for type {spec['type']}; "
            f"allowed: {', '.join(cls.model_fields)}"
        )
    try:
        dist = cls.model_validate(spec)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where}.{field}: {first['msg']} (got {first.get('input')!r})") from None
    if isinstance(dist, FloatDist | IntDist):
        if dist.low >= dist.high:
            raise ValueError(f"{where}: low {dist.low} must be below high {dist.high}")
        if dist.log and (dist.low <= 0 or (isinstance(dist, FloatDist) and dist.step)):
            raise ValueError(f"{where}: log: true needs low > 0 and no float step")
    return dist


class PrunerConfig(Strict):
    """Median pruning: stop a trial whose epoch value is worse than the median of earlier ones."""

    enabled: bool = True
    startup_trials: int = Field(3, ge=0)  # finished trials before any pruning
    warmup_epochs: int = Field(1, ge=0)  # epochs of a trial that are never pruned


class TuneConfig(Strict):
    """`tune` section: the hyperparameter search of `imgcls tune` (docs/tune.md)."""

    # dotted train.* / model.* / augment.* key -> distribution (float / int / categorical)
    space: dict[str, Distribution] = {}
    n_trials: int = Field(20, ge=1)  # finished trials the study should reach (a rerun resumes)
    timeout: float | None = Field(None, gt=0)  # seconds for this invocation
    metric: str | None = None  # epoch-row key to optimise; None: train.monitor
    direction: Literal["auto", "maximize", "minimize"] = "auto"  # auto: minimise *loss
    startup_trials: int = Field(5, ge=0)  # random trials before TPE models the space
    baseline_first: bool = True  # trial 0 = params.yaml's own values (where inside the space)
    pruner: PrunerConfig = PrunerConfig()
    study_name: str | None = None  # None: derived from what the trials train (see docs/tune.md)
    storage: str | None = None  # Optuna RDB URL; None: optuna.db next to the MLflow SQLite store

    @model_validator(mode="before")
    @classmethod
    def _space(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("space"):
            return data
        if not isinstance(data["space"], dict):
            raise ValueError("tune.space must map dotted keys (train.lr) to distributions")
        space = {}
        for key, spec in data["space"].items():
            if str(key).split(".")[0] not in TUNABLE_SECTIONS or "." not in str(key):
                raise ValueError(
                    f"tune.space.{key}: only train.*, model.* and augment.* keys can be searched "
                    "(dotted, e.g. train.lr, model.kwargs.dropout, augment.train.0.p)"
                )
            space[str(key)] = _distribution(str(key), spec)
        return {**data, "space": space}


# --------------------------------------------------------------------------- whole file


class Params(Strict):
    """The whole `params.yaml`."""

    base: BaseSection = BaseSection()
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _tune_keys(self) -> Params:
        # Every searched key must name a real setting, and both ends of its range must be valid
        # values of it: a typo or an impossible bound fails here, not in trial 7.
        for key, dist in self.tune.space.items():
            values = dist.choices if isinstance(dist, CategoricalDist) else [dist.low, dist.high]
            for value in values:
                with_overrides(self, {key: value}, where=f"tune.space.{key}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Fully resolved params as plain data, with the YAML section names."""
        return self.model_dump(mode="json", by_alias=True)


def _missing_key(data: Any, parts: list[str]) -> str | None:
    """Why dotted `parts` cannot be set in `data` (None if it can); lists are indexed by number."""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict) and (part in data or (last and _open_mapping(parts))):
            data = data.get(part)
        else:
            here = ".".join(parts[:i])
            if isinstance(data, dict):
                have = f"its keys: {', '.join(map(str, data))}"
            elif isinstance(data, list):
                have = f"indices 0..{len(data) - 1}"
            else:
                have = "it is a single value"
            return f"{here} has no {part!r} ({have})"
    return None


def _open_mapping(parts: list[str]) -> bool:
    """Keys whose last part may be new: model.kwargs.* and an augmentation's own arguments."""
    return parts[:2] == ["model", "kwargs"] or parts[0] == "augment"


def with_overrides(params: Params, overrides: dict[str, Any], *, where: str = "") -> Params:
    """A copy of `params` with dotted train/model/augment keys set (`augment.train.0.p`).

    Each changed section is validated again; an error names `where` (default: the key).
    """
    data = params.to_dict()
    for key, value in overrides.items():
        parts = key.split(".")
        label = where or key
        if parts[0] not in TUNABLE_SECTIONS:
            raise ValueError(f"{label}: only {', '.join(TUNABLE_SECTIONS)} keys can be overridden")
        problem = _missing_key(data, parts)
        if problem:
            raise ValueError(f"{label}: {problem}")
        target = data
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[parts[-1]] = value
        section = type(getattr(params, parts[0]))
        try:
            section.model_validate(data[parts[0]])
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join([parts[0], *(str(p) for p in first["loc"])])
            raise ValueError(f"{label}: {value!r} is not allowed ({loc}: {first['msg']})") from None
    sections = {key.split(".")[0] for key in overrides}
    update = {name: type(getattr(params, name)).model_validate(data[name]) for name in sections}
    return params.model_copy(update=update)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys a strict section accepts at `loc` (empty where that is not a plain section)."""
    model: Any = Params
    for part in loc[:-1]:
        field = (
            next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
            if isinstance(model, type) and issubclass(model, BaseModel)
            else None
        )
        model = field.annotation if field else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _format_error(err: ValidationError, path: Path) -> str:
    """Turn pydantic's error list into lines that name the section and key."""
    lines = [f"{path}: invalid parameters"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<top level>"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(tuple(item["loc"]))
            known = f"allowed: {', '.join(allowed)}; " if allowed else ""
            lines.append(
                f"  - {key}: unknown key (typo? {known}see the defaults in src/imgcls/config.py)"
            )
        elif item["type"] == "value_error":  # our validators' messages name their key already
            lines.append(f"  - {item['msg'].removeprefix('Value error, ')}")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"  - {key}: {item['msg']}{shown}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any] | None, path: Path | str = "params.yaml") -> Params:
    """Validate a params mapping; raise :class:`ConfigError` naming every bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err, Path(path))) from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate a params YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run from the repository root, next to dvc.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw, path)
