"""RunConfig: defaults -> file -> overrides; bad keys and types fail naming the key; the
shipped configs validate; checkpoints hold only what weights_only accepts."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from multifair.errors import UserError
from multifair.training import checkpoint
from multifair.training.config import resolve_run_config, to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


BASE = "data:\n  kind: fairvision\n  root: /x\nmethod:\n  name: erm\n"


def test_layers_resolve_in_order(tmp_path):
    path = write(tmp_path, BASE + "train:\n  epochs: 3\n  lr: 0.001\n")
    cfg = resolve_run_config(path, ["train.epochs=5", "method.name=multifair", "method.tau=0.1"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.seed) == (5, 0.001, 42)
    assert cfg.method.name == "multifair" and cfg.method.tau == 0.1
    assert cfg.method.rho == 1.2  # a released default of the named method
    assert to_dict(cfg)["method"]["name"] == "multifair"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate=0.1", r"train\.learning_rate: unknown key"),
        ("train.epochs=many", r"train\.epochs: .*'many'"),
        ("method.tua=0.1", r"method\.tua: unknown key"),
        ("method.tau=high", r"method\.tau: .*'high'"),
        ("model.fusion=sum", r"model\.fusion: .*'sum'"),
        ("data.image_size=big", r"data\.image_size: .*'big'"),
        ("output.colour=1", r"output\.colour: unknown key"),
        ("train.select_by=f1", r"train\.select_by: .*'f1'"),
        ("train.select_from=10", r"select_from \(10\) must be below epochs"),
    ],
)
def test_bad_keys_and_types_name_the_key(tmp_path, override, message):
    path = write(tmp_path, BASE)
    with pytest.raises(UserError, match=message):
        resolve_run_config(path, [override])


def test_unknown_method_lists_the_available_ones(tmp_path):
    with pytest.raises(UserError, match=r"method 'multifare' not found. Available: \[.*'erm'"):
        resolve_run_config(write(tmp_path, BASE), ["method.name=multifare"])


def test_method_params_of_another_method_are_rejected(tmp_path):
    # tau belongs to multifair; with erm it is an unknown key, named as such
    with pytest.raises(UserError, match=r"method\.tau: unknown key"):
        resolve_run_config(write(tmp_path, BASE + "  tau: 0.04\n"))


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_validate(name):
    # every top-level config is a training config (benchmark configs live in configs/benchmarks)
    cfg = resolve_run_config(CONFIGS / name)
    assert cfg.train.clip == 0.8
    if name.startswith(("fairvision", "fairvlmed")):
        # the released recipe (method.md section 3)
        assert (cfg.train.lr, cfg.train.aux_lr) == (3e-5, 1e-5)
        assert (cfg.train.weight_decay, cfg.train.aux_weight_decay) == (6e-3, 3e-3)
        assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.seed) == (32, 10, 42)
        assert (cfg.method.rho, cfg.method.lambda_gm, cfg.method.lambda_f) == (1.2, 0.15, 0.5)
        expected = (0.04, 0.3) if name.startswith("fairvision") else (0.07, 0.5)
        assert (cfg.method.tau, cfg.method.delta) == expected


def test_checkpoint_roundtrip_weights_only_and_rng(tmp_path):
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002  (the legacy global RNG is what a checkpoint must restore)
    torch.manual_seed(3)
    state = {
        "format": checkpoint.FORMAT_VERSION,
        "rng": checkpoint.rng_state(),
        "best": {"metric": float("-inf"), "epoch": -1},
        "history": [{"val": {"auc": None}}],
    }
    checkpoint.save_atomic(state, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    draw = lambda: (random.random(), float(np.random.rand()), float(torch.rand(1)))  # noqa: E731, NPY002
    expected = draw()
    loaded = checkpoint.load(tmp_path / "c.pt")  # weights_only=True inside
    checkpoint.set_rng_state(loaded["rng"])
    assert draw() == expected


def test_checkpoint_refuses_foreign_and_truncated_files(tmp_path):
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a multifair checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="not a readable multifair checkpoint"):
        checkpoint.load(tmp_path / "cut.pt")
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")


def test_diabetes_recipe_reuses_the_data_section():
    from multifair.config import load_yaml

    recipe = load_yaml(CONFIGS / "diabetes.yaml")["data"]
    assert recipe == load_yaml(CONFIGS / "data" / "diabetes.yaml")["data"]


def test_config_path_may_contain_an_equals_sign(tmp_path):
    from multifair.training.cli import _split_items

    path = tmp_path / "reweight p=0.5.yaml"
    path.write_text("train: {epochs: 1}\n")
    assert _split_items([str(path), "train.seed=3"]) == (str(path), ["train.seed=3"])
    # a non-existent name with '=' is an override, as before
    assert _split_items(["train.seed=3"]) == (None, ["train.seed=3"])
    assert _split_items(["c.yaml", "a=1"]) == ("c.yaml", ["a=1"])
