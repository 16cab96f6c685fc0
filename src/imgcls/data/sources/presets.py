"""Presets: `rps` (two verified archives) and `fashion-mnist` (IDX files, a local copy first)."""

from __future__ import annotations

from pathlib import Path

from imgcls.config import GroupConfig, SourceSpec
from imgcls.data.sources.archive import archive_stem
from imgcls.data.sources.common import DOWNLOADS, SourceError, under
from imgcls.data.sources.download import download

RPS_BASE = "https://storage.googleapis.com/download.tensorflow.org/data/"
RPS_SOURCES: tuple[tuple[str, str, str | None], ...] = (
    ("rps.zip", "c2403444395842ad04c53612bad54b574443eae17a0723117a2ff87b9d72194f", None),
    (
        "rps-test-set.zip",
        "c27ab9fa43ce40b2e453de711365b477f4424586edf0388116674fd320f07503",
        "test",
    ),
)
# The hand id: `rock01-000.png` -> "01", `paper04-080.png` -> "04" (the same hand in every pose is
# one group); the test set's `testrock01-00.png` -> "test01", so test hands never merge with
# training hands of the same number.
RPS_GROUP = GroupConfig(by="regex", pattern=r"^(test)?(?:rock|paper|scissors)(\d+)-")

# Fashion-MNIST's canonical files (the https copy in the dataset's own repository; same bytes as
# the S3 links in its README, whose published MD5s they match).
FASHION_BASE = (
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
)
FASHION_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",  # noqa: E501
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",  # noqa: E501
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
FASHION_CLASSES = [
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
# Where Debian's `dataset-fashion-mnist` package installs the IDX files (re-gzipped, so their
# digests differ from the canonical ones, so they are used as installed, not checked against
# the download digests).
FASHION_LOCAL_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
PRESETS = ("rps", "fashion-mnist")


def expand_preset(spec: SourceSpec, group: GroupConfig) -> list[SourceSpec]:
    """Expand a preset into the sources it stands for."""
    if spec.preset == "rps":
        rule = RPS_GROUP if group.by == "none" else None  # an explicit data.group wins
        return [
            SourceSpec(
                kind="url",
                url=RPS_BASE + fname,
                sha256=digest,
                name=archive_stem(fname),
                split=split or spec.split,
                group=spec.group or rule,
            )
            for fname, digest, split in RPS_SOURCES
        ]
    if spec.preset == "fashion-mnist":
        name = spec.name or "fashion-mnist"
        for local in FASHION_LOCAL_DIRS:
            if all((local / f).is_file() for f in FASHION_FILES):
                return [
                    SourceSpec(
                        kind="idx",
                        path=str(local),
                        name=name,
                        classes=FASHION_CLASSES,
                        group=spec.group,
                    )
                ]
        return [
            SourceSpec(
                kind="idx",
                path=None,
                name=name,
                classes=FASHION_CLASSES,
                group=spec.group,
                url=FASHION_BASE,
            )
        ]
    raise SourceError(
        f"data.source: unknown preset {spec.preset!r}; known presets: {', '.join(PRESETS)}"
    )


def fetch_fashion(spec: SourceSpec, raw_dir: Path, progress: bool, max_bytes: int) -> Path:
    """Download the canonical Fashion-MNIST IDX files (verified) into data/raw/downloads/."""
    folder = under(raw_dir / DOWNLOADS, str(spec.name), spec)
    for fname, digest in FASHION_FILES.items():
        download(
            str(spec.url) + fname, digest, folder / fname, progress=progress, max_bytes=max_bytes
        )
    return folder
