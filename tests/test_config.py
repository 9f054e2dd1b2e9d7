import pytest
from pydantic import BaseModel, ConfigDict

from multifair.config import deep_merge, parse_overrides, resolve
from multifair.errors import UserError
from multifair.registry import Registry


class Train(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = 1e-3
    epochs: int = 1


class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: Train = Train()
    name: str = "x"


def test_overrides_are_parsed_as_yaml_scalars_and_nested():
    assert parse_overrides(["train.lr=3e-5", "name=erm", "train.epochs=3"]) == {
        "train": {"lr": 3e-5, "epochs": 3},
        "name": "erm",
    }


def test_deep_merge_keeps_untouched_keys():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_resolve_defaults_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 5\n")
    cfg = resolve(Cfg, {"name": "d"}, path, ["train.epochs=7"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.name) == (0.1, 7, "d")


def test_unknown_key_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(UserError, match=r"train\.learning_rate: unknown key"):
        resolve(Cfg, {}, path)


def test_wrong_type_names_key_and_value():
    with pytest.raises(UserError, match=r"train\.epochs.*'many'"):
        resolve(Cfg, {}, None, ["train.epochs=many"])


def test_bad_override_and_missing_file():
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["epochs"])
    with pytest.raises(UserError, match="not found"):
        resolve(Cfg, {}, "/nonexistent.yaml")


def test_registry_lists_available_names():
    reg: Registry[int] = Registry("encoder")
    reg.register("cnn")(1)
    reg.register("mlp")(2)
    assert reg.get("cnn") == 1 and reg.names() == ["cnn", "mlp"]
    with pytest.raises(UserError, match=r"encoder 'vit' not found. Available: \['cnn', 'mlp'\]"):
        reg.get("vit")
    with pytest.raises(ValueError, match="twice"):
        reg.register("cnn")(3)
