"""The configured limits reach every use: training, the model file, predict, validate, the cache.

`data.max_image_pixels` bounds the train stage's decoding and travels in the model's metadata
to `imgcls predict` and serving; every 16-bit mode the decoder handles passes validate; the
decoded-image cache checks free space before it starts, on a real small tmpfs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _datasets import with_splits, write_pattern_dataset
from imgcls.config import DataConfig, Params, ValidateConfig, load_params, parse_params
from imgcls.data.dataset import DecodeError, decode_images, load_split_data, npy_bytes
from imgcls.data.manifest import build_manifest
from imgcls.data.validation import validate_manifest
from imgcls.errors import ImgclsError
from imgcls.inference.predict import load_predictor, predict_paths
from imgcls.io import read_csv, write_csv
from imgcls.models.bundle import load_bundle, save_bundle
from imgcls.training.train import load_training_data, train_model

REPO = Path(__file__).resolve().parents[1]


def _params(max_image_pixels: int) -> Params:
    """A one-epoch simple_cnn on 16x16 images with the given `data.max_image_pixels`."""
    return parse_params(
        {
            "data": {"max_image_pixels": max_image_pixels},
            "model": {"name": "simple_cnn", "kwargs": {"widths": [8, 16]}},
            "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "image_size": 16, "device": "cpu"},
            "augment": {"train": [], "eval": []},
        }
    )


def _splits(root: Path, per_class: int = 8) -> Path:
    """splits.csv of a real 3-class dataset of 16x16 grayscale PNGs (256 pixels each)."""
    splits = root / "data/processed/splits.csv"
    splits.parent.mkdir(parents=True)
    with_splits(write_pattern_dataset(root, per_class=per_class)).to_csv(splits, index=False)
    return splits


def _png(path: Path, width: int, height: int) -> Path:
    """A real black grayscale PNG of width x height."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((height, width), np.uint8)).save(path, format="PNG")
    return path


# ------------------------------------------------------------- data.max_image_pixels


@pytest.mark.usefixtures("one_torch_thread")
def test_the_trained_model_carries_the_configured_limit_and_predict_holds_to_it(
    tmp_path: Path,
) -> None:
    params = _params(max_image_pixels=1000)
    data = load_training_data(
        params, _splits(tmp_path), tmp_path, tmp_path / "cache", progress=False
    )
    result, meta = train_model(params, data, checkpoint_path=None, progress=False)
    save_bundle(tmp_path / "model.pt", result.model, meta)

    limits = load_bundle(tmp_path / "model.pt")[1]["limits"]
    assert limits["max_image_pixels"] == 1000  # not Pillow's 89478485
    _png(tmp_path / "in/ok.png", 30, 30)  # 900 pixels
    _png(tmp_path / "in/big.png", 40, 30)  # 1200 pixels: under Pillow's limit, over ours
    preds = predict_paths(
        load_predictor(tmp_path / "model.pt", device="cpu"), [str(tmp_path / "in")], progress=False
    )
    rows = {Path(p.path).name: (p.label, p.error) for p in preds}
    assert rows["big.png"] == (None, "too large: 40x30 > max_image_pixels (1000)")
    assert rows["ok.png"][1] is None and rows["ok.png"][0] in meta["classes"]


def test_training_decodes_within_data_max_image_pixels(tmp_path: Path) -> None:
    # 16x16 = 256 pixels per image; ingest would have refused them at 200, so a file that now
    # claims more than the limit is not the one ingest checked.
    splits = _splits(tmp_path, per_class=2)
    with pytest.raises(DecodeError, match=r"\.png: too large: 16x16 > max_image_pixels \(200\)"):
        load_training_data(_params(200), splits, tmp_path, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # no half-built cache left behind


def test_evaluation_data_can_be_decoded_within_the_models_limit(tmp_path: Path) -> None:
    # load_split_data decodes for the evaluate stage, which has the model's limits at hand.
    splits = _splits(tmp_path, per_class=2)
    cache = tmp_path / "cache"
    with pytest.raises(DecodeError, match=r"too large: 16x16 > max_image_pixels \(200\)"):
        load_split_data(splits, tmp_path, 16, "auto", cache, progress=False, max_pixels=200)
    data = load_split_data(splits, tmp_path, 16, "auto", cache, progress=False, max_pixels=256)
    assert data.images.shape == (6, 16, 16, 1)


# ------------------------------------------------------------- 16-bit modes in validate


def _tiff16_big_endian(path: Path, seed: int) -> Path:
    """A real 16-bit grayscale TIFF stored big-endian ("MM"): Pillow opens it as I;16B."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 65536, (4, 4)).astype(np.float64)
    arr = np.kron(small, np.ones((4, 4))).astype(">u2")  # 16x16 blocks: a distinct pHash
    img = Image.frombytes("I;16B", (16, 16), arr.tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="TIFF")
    return path


def test_a_folder_of_big_endian_16_bit_tiffs_passes_validate(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml")
    for k, label in enumerate(("bright", "dark")):
        for i in range(params.validate_.min_images_per_class):
            _tiff16_big_endian(tmp_path / "scans" / label / f"{i:02d}.tif", seed=100 * k + i)
    cfg = DataConfig.model_validate({"source": "scans", "workers": 1})
    write_csv(
        tmp_path / "manifest.csv",
        build_manifest(cfg, tmp_path, tmp_path / "data/raw", progress=False),
    )
    manifest = read_csv(tmp_path / "manifest.csv")  # as the validate stage reads it
    assert set(manifest["mode"]) == {"I;16B"} and set(manifest["error"]) == {""}

    result = validate_manifest(manifest, params.validate_, root=tmp_path)
    assert result.ok, result.summary()
    assert len(result.valid) == len(manifest)
    # The default contract (no `validate:` section) accepts every 16-bit variant too.
    assert {"I;16", "I;16B", "I;16L", "I;16N"} <= set(ValidateConfig().allowed_modes)
    assert validate_manifest(manifest, ValidateConfig(), root=tmp_path).ok


# ------------------------------------------------------------- the cache on a full disk


def test_the_decode_cache_on_a_full_disk_says_so_before_decoding(
    tmp_path: Path, small_fs: Path
) -> None:
    # 132 rows: three chunks of work, so the old code's SIGBUS killed a worker, not pytest.
    df = with_splits(write_pattern_dataset(tmp_path, per_class=44))
    cache = small_fs / "cache"
    fits = decode_images(df, tmp_path, 16, 1, cache, workers=2, progress=False)  # 33,920 B
    assert fits.shape == (132, 16, 16, 1)
    kept = sorted(p.name for p in cache.iterdir())

    with pytest.raises(ImgclsError) as err:
        decode_images(df, tmp_path, 32, 3, cache, workers=2, progress=False)  # 405,632 B
    message = str(err.value)
    assert f"cannot write {cache}/images-" in message and ".npy: no space left" in message
    assert "needs 405,632 bytes" in message  # 128-byte header + 132 * 32 * 32 * 3 pixels
    free = int(message.split("bytes, ")[1].split(" bytes free")[0].replace(",", ""))
    assert 0 < free < 405_632
    assert sorted(p.name for p in cache.iterdir()) == kept  # no big cache, no temp file
    assert np.array_equal(np.load(cache / kept[0]), np.asarray(fits))


def test_the_bytes_the_cache_needs_are_the_size_of_the_file_it_writes(tmp_path: Path) -> None:
    for shape in [(0, 8, 8, 1), (5, 7, 7, 3), (132, 32, 32, 3)]:
        path = tmp_path / f"{len(shape)}-{shape[0]}.npy"
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
        assert npy_bytes(shape) == path.stat().st_size, shape
