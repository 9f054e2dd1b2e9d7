"""Methods on data with missing modalities: every per-modality loss and signal uses only the
samples that have the modality. The tests change what an absent sample's modality feature and
auxiliary head say (what a placeholder would produce) and require identical losses and
signals; the same change without the mask moves them (so the tests can fail)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_ctx, tiny_batch, tiny_model
from sklearn.metrics import roc_auc_score

from multifair.methods.base import METHODS, ModelOutput, aux_loss, build_method, supporting_methods

G = 3
SIZE = 48


def _batch():
    batch = tiny_batch(("a", "b"), size=SIZE, n_groups=G, seed=3)
    have_b = torch.ones(SIZE, dtype=torch.bool)
    have_b[::3] = False  # a third of the samples lack "b"
    batch["present"] = {"a": torch.ones(SIZE, dtype=torch.bool), "b": have_b}
    return batch


def _scrambled(out: ModelOutput, have: torch.Tensor, seed: int = 7) -> ModelOutput:
    """The same output, with modality b's feature and aux logits replaced where it is absent
    (confidently wrong: what a placeholder might make the head say)."""
    g = torch.Generator().manual_seed(seed)
    absent = ~have
    feature = torch.where(absent[:, None], 30 * torch.randn(out.features["b"].shape, generator=g), out.features["b"])  # fmt: skip
    aux = torch.where(absent[:, None], 20 * torch.randn(out.aux_logits["b"].shape, generator=g), out.aux_logits["b"])  # fmt: skip
    return ModelOutput(
        out.logits, {**out.features, "b": feature}, {**out.aux_logits, "b": aux}, out.head_input
    )


def _loss(name: str, params: dict, out: ModelOutput, batch: dict, model) -> tuple[float, dict]:
    torch.manual_seed(0)
    method = build_method(name, params, ["a", "b"], G).train()
    loss = method.loss(out, batch, make_ctx(model, G))
    signals = {k: float(v) for k, v in loss.signals.items()}
    return float(loss.total.detach()), signals


CASES = [
    ("erm", {}),
    ("reweight", {}),
    ("groupdro", {}),
    ("multifair", {}),
    ("multifair_adam", {}),
    ("multifair_adam", {"unimodal_weight": 1.0, "group_weights": "validation"}),
]


@pytest.mark.parametrize(("name", "params"), CASES)
def test_absent_samples_do_not_move_losses_or_signals(name, params):
    model = tiny_model(("a", "b"))
    batch = _batch()
    out = model(batch)
    scrambled = _scrambled(out, batch["present"]["b"])
    total, signals = _loss(name, params, out, batch, model)
    total_s, signals_s = _loss(name, params, scrambled, batch, model)
    assert total_s == pytest.approx(total, abs=1e-5)
    assert signals_s == pytest.approx(signals, abs=1e-5)
    # without the mask the scrambled samples count, and the numbers move
    unmasked = {k: v for k, v in batch.items() if k != "present"}
    total_u, signals_u = _loss(name, params, scrambled, unmasked, model)
    moved = abs(total_u - total) > 1e-3 or any(
        abs(signals_u[k] - signals[k]) > 1e-3 for k in signals if k in signals_u
    )
    assert moved


def test_aux_loss_is_the_mean_over_present_samples():
    model = tiny_model(("a", "b"))
    batch = _batch()
    out = model(batch)
    have = batch["present"]["b"]
    y = batch["label"]
    want = F.cross_entropy(out.aux_logits["a"], y) + F.cross_entropy(
        out.aux_logits["b"][have], y[have]
    )
    assert float(aux_loss(out, batch).detach()) == pytest.approx(float(want.detach()), rel=1e-6)


@pytest.mark.parametrize("name", ["multifair", "multifair_adam"])
def test_modality_auc_signal_matches_sklearn_on_present_samples(name):
    model = tiny_model(("a", "b"))
    batch = _batch()
    out = model(batch)
    have = batch["present"]["b"].numpy()
    y = batch["label"].numpy()
    _, signals = _loss(name, {}, out, batch, model)
    margin = (out.aux_logits["b"][:, 1] - out.aux_logits["b"][:, 0]).detach().numpy()
    assert signals["aux_auc/b"] == pytest.approx(roc_auc_score(y[have], margin[have]), abs=1e-6)
    assert signals["aux_auc/b"] != pytest.approx(roc_auc_score(y, margin), abs=1e-6)


def test_validation_levels_use_present_samples():
    from multifair.training.inference import Predictions

    rng = np.random.default_rng(0)
    n = 200
    label = rng.integers(0, 2, n)
    score_b = np.clip(np.where(label == 1, 0.7, 0.3) + rng.normal(0, 0.2, n), 0, 1)
    score_b[::4] = np.nan  # absent: NaN, as `predict` writes it
    preds = Predictions(
        index=np.arange(n),
        sample_id=[str(i) for i in range(n)],
        label=label,
        score=rng.random(n),
        aux_scores={"a": rng.random(n), "b": score_b},
        present={"b": np.isfinite(score_b)},
    )
    method = build_method("multifair_adam", {"levels": "validation"}, ["a", "b"], G)
    stats = method.on_validation(preds)
    have = np.isfinite(score_b)
    assert stats["val_level/b"] == pytest.approx(roc_auc_score(label[have], score_b[have]))


def test_methods_that_cannot_handle_missing_refuse():
    names = supporting_methods()
    assert {"erm", "multifair", "multifair_adam", "reweight", "groupdro"} <= set(names)
    for name in ("ogm_ge", "pmr", "dgl", "multifair_released", "fin"):
        assert not METHODS.get(name).supports_missing, name
    # group stacking reads an absent modality's head margin as 0: it trains on such data
    # (tests/methods/test_stacking_missing.py)


def test_trainer_refuses_an_unsupporting_method(tmp_path, capsys):
    import pandas as pd
    import yaml

    from multifair.cli import main

    rng = np.random.default_rng(0)
    n = 60
    frame = pd.DataFrame(
        {"y": rng.integers(0, 2, n), "sex": rng.choice(["F", "M"], n), "a1": rng.normal(size=n)}
    )
    frame["b1"] = rng.normal(size=n)
    frame.loc[::5, "b1"] = np.nan  # every 5th patient lacks modality b
    frame.to_csv(tmp_path / "t.csv", index=False)
    config = {
        "data": {
            "kind": "table",
            "path": str(tmp_path / "t.csv"),
            "label": "y",
            "attribute": "sex",
            "attribute_columns": {"sex": "sex"},
            "columns": {"a": {"columns": ["a1"]}, "b": {"columns": ["b1"]}},
            "min_group_size": 0,
            "num_workers": 0,
        },
        "model": {"preset": "small", "dim": 8, "heads": 2, "layers": 1},
        "method": {"name": "ogm_ge"},
        "train": {"epochs": 1, "progress": False, "tensorboard": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "method 'ogm_ge' does not support missing modalities" in err
    assert "data.missing_modalities" in err
    # a model that reads only the complete modality trains (only its own modalities count)
    config["method"] = {"name": "unimodal", "modality": "a"}
    config["output"] = {"dir": str(tmp_path / "run_a")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    config["method"] = {"name": "unimodal", "modality": "b"}
    config["output"] = {"dir": str(tmp_path / "run_b")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "method 'unimodal' does not support missing modalities" in capsys.readouterr().err
