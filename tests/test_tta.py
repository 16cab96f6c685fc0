"""`model.tta`: the model file averages each image's logits over its mirror (and shifted) views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from imgcls.config import Params
from imgcls.models import create_model
from imgcls.models.bundle import ImageClassifier, WithTTA, load_bundle, save_bundle
from imgcls.models.registry import ModelError

MEAN, STD = [0.5], [0.25]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return create_model("simple_cnn", in_chans=1, num_classes=3, image_size=8, widths=[4, 8])


def _images(n: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 8, 8, 1), dtype=torch.uint8, generator=gen)


def _meta(tta: str) -> dict:
    return {
        "arch": "simple_cnn",
        "model_kwargs": {"widths": [4, 8]},
        "classes": ["a", "b", "c"],
        "task": "multiclass",
        "image_size": 8,
        "channels": 1,
        "mean": MEAN,
        "std": STD,
        "tta": tta,
    }


def test_hflip_averages_the_logits_of_the_image_and_its_mirror() -> None:
    net = _net().eval()
    x = _images()
    plain = ImageClassifier(net, MEAN, STD).eval()
    tta = ImageClassifier(net, MEAN, STD, tta="hflip").eval()
    with torch.no_grad():
        prep = plain.prep(x.permute(0, 3, 1, 2))
        want = torch.softmax((net(prep) + net(prep.flip(-1))) / 2, dim=1)
        got, base = tta(x), plain(x)
        mirrored = tta(x.flip(2))  # (B, H, W, C): W is dim 2
        net_tta = WithTTA(net, "hflip")(prep)  # what val-threshold tuning sees
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(torch.softmax(net_tta, dim=1), want, atol=1e-6)
    assert not torch.allclose(got, base, atol=1e-4)  # the mirror changed the answer
    assert torch.allclose(mirrored, got, atol=1e-5)  # and a mirrored image answers the same
    with pytest.raises(ModelError, match="unknown"):
        ImageClassifier(net, MEAN, STD, tta="rot90")


def test_hflip_shift_adds_the_mirrored_pair_shifted_a_pixel_each_way() -> None:
    net = _net().eval()
    x = _images()
    with torch.no_grad():
        prep = ImageClassifier(net, MEAN, STD).prep(x.permute(0, 3, 1, 2))
        pair = lambda v: (net(v) + net(v.flip(-1))) / 2  # noqa: E731
        # One pixel down-right and one up-left, the edge row / column repeated, built by hand
        down = torch.cat([prep[..., :1, :], prep[..., :-1, :]], dim=-2)
        down = torch.cat([down[..., :1], down[..., :-1]], dim=-1)
        up = torch.cat([prep[..., 1:, :], prep[..., -1:, :]], dim=-2)
        up = torch.cat([up[..., 1:], up[..., -1:]], dim=-1)
        want = (pair(prep) + (pair(down) + pair(up)) / 2) / 2
        got = WithTTA(net, "hflip_shift")(prep)
        clf = ImageClassifier(net, MEAN, STD, tta="hflip_shift").eval()
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.allclose(clf(x), torch.softmax(want, dim=1), atol=1e-6)
        assert not torch.allclose(got, WithTTA(net, "hflip")(prep), atol=1e-4)


def test_the_model_file_carries_tta_to_every_user(tmp_path: Path) -> None:
    net = _net()
    save_bundle(tmp_path / "tta.pt", net, _meta("hflip"))
    clf, meta = load_bundle(tmp_path / "tta.pt")
    assert clf.tta == "hflip" and meta["tta"] == "hflip"
    old = _meta("none")
    del old["tta"]  # a file written before model.tta existed
    save_bundle(tmp_path / "old.pt", net, old)
    assert load_bundle(tmp_path / "old.pt")[0].tta == "none"
    save_bundle(tmp_path / "bad.pt", net, _meta("rot90"))
    with pytest.raises(ModelError, match="bad.pt: metadata tta 'rot90' unknown"):
        load_bundle(tmp_path / "bad.pt")
    x = np.asarray(_images())
    with torch.no_grad():
        expected = ImageClassifier(net, MEAN, STD, tta="hflip").eval()(torch.from_numpy(x))
        assert torch.allclose(clf(torch.from_numpy(x)), expected, atol=1e-6)


def test_params_accept_only_known_tta() -> None:
    assert Params.model_validate({"model": {"tta": "hflip"}}).model.tta == "hflip"
    assert Params.model_validate({"model": {"tta": "hflip_shift"}}).model.tta == "hflip_shift"
    assert Params.model_validate({}).model.tta == "none"
    with pytest.raises(ValueError, match="tta"):
        Params.model_validate({"model": {"tta": "mirror"}})
