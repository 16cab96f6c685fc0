"""params.yaml is typed and strict: typos fail loudly with the section and key named."""

from pathlib import Path

import pytest
import yaml

from imgcls.config import ConfigError, Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_file_is_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "digits"
    assert params.split.train + params.split.val + params.split.test == pytest.approx(1.0)


def test_every_section_is_present_in_params_yaml() -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(Params().to_dict())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"epohcs": 3}}, "train.epohcs: unknown key"),
        ({"trian": {"epochs": 3}}, "trian: unknown key"),
        ({"train": {"epochs": "many"}}, "train.epochs"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"split": {"train": 0.9, "val": 0.2, "test": 0.1}}, "must be 1.0"),
        ({"data": {"group": {"by": "regex"}}}, "data.group.pattern is empty"),
        ({"validate": {"max_quarantine_fraction": 2}}, "validate.max_quarantine_fraction"),
    ],
)
def test_bad_keys_and_values_are_named(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert expected in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_params(scalar)


def test_resolved_config_uses_yaml_section_names() -> None:
    resolved = Params().to_dict()
    assert "validate" in resolved and "validate_" not in resolved
