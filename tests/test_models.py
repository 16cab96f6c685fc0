"""Every registered model builds, runs and learns; timm names share the registry."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from imgcls.models import ModelError, create_model, list_custom_models

TIMM_SAMPLE = ["resnet18", "mobilenetv3_small_050", "efficientnet_b0"]


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
