"""Every registered model builds, runs and learns; timm names share the registry."""

import socket
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from imgcls.models import ModelError, create_model, list_custom_models

TIMM_SAMPLE = ["resnet18", "mobilenetv3_small_050", "efficientnet_b0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache and a hub endpoint where nothing listens: offline, deterministically."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connections are refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "hf"


def _one_step_lowers_loss(model: torch.nn.Module, in_chans: int, size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, in_chans, size, size)
    y = torch.arange(8) % 3
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", list_custom_models())
@pytest.mark.parametrize(("in_chans", "size"), [(1, 16), (3, 28)])
def test_custom_model_forward_and_step(name: str, in_chans: int, size: int) -> None:
    model = create_model(name, in_chans=in_chans, num_classes=3, image_size=size)
    out = model.eval()(torch.randn(2, in_chans, size, size))
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()
    _one_step_lowers_loss(model, in_chans, size)


def test_simple_cnn_can_pool_before_norm() -> None:
    """Each stage's last conv is pooled before its BN + ReLU: same weights, smaller activations."""
    torch.manual_seed(0)
    kw = {"widths": [4, 8, 16], "convs_per_stage": [1, 2, 1]}
    plain = create_model("simple_cnn", in_chans=1, num_classes=3, image_size=28, **kw)
    early = create_model(
        "simple_cnn", in_chans=1, num_classes=3, image_size=28, pool_before_norm=True, **kw
    )
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert sorted(shapes.values()) == sorted(v.shape for v in early.state_dict().values())
    seen: list[tuple[int, ...]] = []
    for m in early.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_hook(lambda _m, i, _o: seen.append(tuple(i[0].shape[-2:])))
    out = early.eval()(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 3)
    # BN sees 14x14 after the pooled 28x28 conv, 7x7 after the 14x14 stage's last conv
    assert seen == [(14, 14), (14, 14), (7, 7), (7, 7)]
    _one_step_lowers_loss(early, 1, 28)


def test_simple_cnn_head_grid_sees_where_a_feature_is() -> None:
    """`head_grid: 3` reads a 3x3 grid of the last stage: the same blob in two places differs."""
    torch.manual_seed(0)
    kw = {"widths": [4, 8, 16], "convs_per_stage": [1, 1, 1], "pool_before_norm": True}
    gap = create_model("simple_cnn", in_chans=1, num_classes=3, image_size=28, **kw).eval()
    grid = create_model(
        "simple_cnn", in_chans=1, num_classes=3, image_size=28, head_grid=3, **kw
    ).eval()
    assert isinstance(grid[-1], torch.nn.Linear) and grid[-1].in_features == 16 * 9
    # a blob on a zero background (40 px: no conv's reach hits the border), moved by 16 px (a
    # multiple of the two pools' stride 4): the convs see the same thing, so the global average
    # cannot tell the places apart
    top_left, bottom_right = torch.zeros(2, 1, 1, 40, 40)
    top_left[..., 8:12, 8:12] = 1.0
    bottom_right[..., 24:28, 24:28] = 1.0
    with torch.no_grad():
        torch.testing.assert_close(gap(top_left), gap(bottom_right))
        assert (grid(top_left) - grid(bottom_right)).abs().max() > 1e-3
        # any input size (progressive resizing trains at 16-24 px before 28)
        for size in (16, 20, 24, 28):
            assert grid(torch.randn(2, 1, size, size)).shape == (2, 3)
    _one_step_lowers_loss(grid.train(), 1, 28)
    with pytest.raises(ModelError, match="head_grid 0 must be >= 1"):
        create_model("simple_cnn", in_chans=1, num_classes=3, image_size=28, head_grid=0)


@pytest.mark.parametrize("name", TIMM_SAMPLE)
def test_timm_models_through_registry(name: str) -> None:
    model = create_model(name, in_chans=1, num_classes=3, image_size=32)
    out = model.eval()(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    _one_step_lowers_loss(model, 1, 32)


def test_registry_lists_the_course_progression() -> None:
    assert {"mlp", "lenet5", "simple_cnn", "small_resnet"} <= set(list_custom_models())


def test_unknown_name_and_bad_kwargs_are_clear() -> None:
    with pytest.raises(ModelError, match="resnet"):
        create_model("resnet_9000", in_chans=3, num_classes=2, image_size=32)
    with pytest.raises(ModelError, match="model.kwargs"):
        create_model("simple_cnn", in_chans=3, num_classes=2, image_size=32, nope=1)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_pretrained_weights_load(tmp_path: Path, suffix: str) -> None:
    donor = create_model("simple_cnn", in_chans=1, num_classes=5, image_size=16)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    else:
        torch.save(donor.state_dict(), path)
    # Different number of classes: the backbone loads, the head stays freshly initialised.
    model = create_model(
        "simple_cnn", in_chans=1, num_classes=3, image_size=16, pretrained_path=path
    )
    first_conv = next(k for k in donor.state_dict() if k.endswith("weight"))
    assert torch.equal(model.state_dict()[first_conv], donor.state_dict()[first_conv])
    head = list(model.children())[-1]
    assert head.weight.shape[0] == 3
    assert not torch.equal(head.weight[:3], list(donor.children())[-1].weight[:3])


def test_pretrained_missing_file_and_wrong_arch(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        create_model(
            "mlp", in_chans=1, num_classes=2, image_size=8, pretrained_path=tmp_path / "x.pth"
        )
    path = tmp_path / "other.pth"
    torch.save({"foo": torch.zeros(3)}, path)
    with pytest.raises(ModelError, match="no tensor matches"):
        create_model("mlp", in_chans=1, num_classes=2, image_size=8, pretrained_path=path)


def test_pretrained_offline_fails_fast_with_advice(offline_hub: Path) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="model.pretrained_path") as info:
        create_model("resnet18", in_chans=3, num_classes=2, image_size=32, pretrained=True)
    # huggingface_hub alone retries for ~50 s; 25 s tells the two apart on a loaded machine
    assert time.perf_counter() - t0 < 25
    assert "resnet18" in str(info.value) and ".safetensors" in str(info.value)
    with pytest.raises(ModelError, match="no published weights"):
        create_model("simple_cnn", in_chans=1, num_classes=2, image_size=16, pretrained=True)


def _donor(name: str) -> torch.nn.Module:
    """A timm model as published: 3 input channels, 1000 classes."""
    torch.manual_seed(1)
    return timm.create_model(name, pretrained=False)


@pytest.mark.parametrize("source", ["hub-cache", "file.safetensors", "file.pth"])
def test_timm_pretrained_weights_offline(offline_hub: Path, tmp_path: Path, source: str) -> None:
    name = "mobilenetv3_small_050"
    donor = _donor(name)
    state = {k: v.contiguous() for k, v in donor.state_dict().items()}
    kwargs: dict = {}
    if source == "hub-cache":  # what an earlier online download leaves behind
        repo = timm.models.get_pretrained_cfg(name).hf_hub_id
        entry = offline_hub / f"models--{repo.replace('/', '--')}"
        (entry / "refs").mkdir(parents=True)
        (entry / "refs" / "main").write_text("0123abc")
        (entry / "snapshots" / "0123abc").mkdir(parents=True)
        save_file(state, str(entry / "snapshots" / "0123abc" / "model.safetensors"))
        kwargs["pretrained"] = True
    else:
        path = tmp_path / f"weights.{source.split('.')[1]}"
        if path.suffix == ".pth":
            torch.save(state, path)
        else:
            save_file(state, str(path))
        kwargs["pretrained_path"] = path
    model = create_model(name, in_chans=1, num_classes=3, image_size=32, **kwargs)
    # timm adapts the RGB stem to one channel (sums the filters) and keeps a fresh 3-class head.
    expected = donor.conv_stem.weight.sum(dim=1, keepdim=True)
    assert torch.allclose(model.conv_stem.weight, expected, atol=1e-5)
    assert model.get_classifier().out_features == 3
    assert torch.isfinite(model.eval()(torch.randn(2, 1, 32, 32))).all()


def test_timm_pretrained_path_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "lenet.safetensors"
    donor = create_model("lenet5", in_chans=1, num_classes=3, image_size=16)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    with pytest.raises(ModelError, match="cannot load it into timm model"):
        create_model(
            "mobilenetv3_small_050", in_chans=1, num_classes=3, image_size=32, pretrained_path=path
        )
