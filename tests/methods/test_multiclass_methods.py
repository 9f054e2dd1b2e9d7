"""Every registered method either trains a 3-class model or refuses it when it is built.

The loop runs over METHODS, so a new method cannot slip in with a hidden binary assumption
unnoticed: it must train one step on a 3-class model (finite loss, finite gradients, the
post-validation hook fed 3-class predictions) or raise a `UserError` from `build_method`
naming itself. The methods known to refuse are listed, so a refusal is a decision, not an
accident."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_ctx, one_step, tiny_batch

import multifair.methods  # noqa: F401  (registers every method)
from multifair.errors import UserError
from multifair.methods.base import METHODS, build_method
from multifair.models.factory import build_model
from multifair.training.config import TrainConfig
from multifair.training.inference import Predictions
from multifair.training.trainer import build_optimizer

K, G = 3, 3
REFUSE = {"multifair", "multifair_released"}  # binary AUC signals and gradient modulation


def three_class_model(modalities: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    specs = {m: SimpleNamespace(kind="tabular", shape=(5,)) for m in modalities}
    cfg = {"preset": "small", "dim": 8, "heads": 2, "layers": 1}
    cfg["encoders"] = {m: {"hidden": [8]} for m in modalities}
    return build_model(cfg, specs, n_classes=K)


@pytest.mark.parametrize("name", METHODS.names())
def test_each_method_trains_three_classes_or_refuses_at_build(name):
    cls = METHODS.get(name)
    modalities = cls.model_modalities(cls.Params(), ["a", "b"])
    if name in REFUSE:
        with pytest.raises(UserError, match=rf"'{name}'.*3 classes"):
            build_method(name, {}, modalities, G, n_classes=K)
        build_method(name, {}, modalities, G, n_classes=2)  # binary still builds
        return
    model = three_class_model(modalities)
    assert model.head_last_layer().out_features == K
    method = build_method(name, {}, modalities, G, n_classes=K)
    method.setup(model)
    y = torch.arange(24) % K  # every class in the batch
    batches = [tiny_batch(["a", "b"], size=24, n_groups=G, seed=s, labels=y) for s in (1, 2)]
    ctx = make_ctx(model, G)
    ctx.extras["train_batches"] = batches
    model.train()
    method.train()
    method.on_epoch_start(ctx)
    optimizer, groups = build_optimizer(model, method, TrainConfig(lr=1e-3), torch.device("cpu"))
    result = one_step(
        batches[0], model=model, method=method, optimizer=optimizer, groups=groups, ctx=ctx
    )
    method.on_epoch_end(ctx)
    assert torch.isfinite(result.loss.total), f"{name}: non-finite 3-class loss"
    head = model.head_last_layer().weight.grad
    assert head is not None and torch.isfinite(head).all()
    assert (head.abs().sum(dim=1) > 0).all(), f"{name}: a class row of the head got no gradient"
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.ones(K), 60)
    codes = np.arange(60) % G
    preds = Predictions(
        index=np.arange(60),
        sample_id=[str(i) for i in range(60)],
        label=np.arange(60) % K,
        score=scores,
        attributes={"attr": codes},
        aux_scores={m: scores for m in modalities},
        classes=["x", "y", "z"],
    )
    assert isinstance(method.on_validation(preds, codes) or {}, dict)


def test_groupdro_refuses_label_pairs_with_three_classes():
    with pytest.raises(UserError, match=r"groupdro.*attribute_label"):
        build_method("groupdro", {"groups": "attribute_label"}, ["a", "b"], G, n_classes=K)
    build_method("groupdro", {"groups": "attribute"}, ["a", "b"], G, n_classes=K)


@pytest.mark.parametrize("fusion", ["stacking", "blind_stacking"])
def test_multifair_adam_group_stacking_refuses_three_classes_the_rest_builds(fusion):
    # the stacking recombines binary margins: that option refuses, the method does not
    with pytest.raises(UserError, match=rf"'multifair_adam'.*group_fusion: {fusion}.*3 classes"):
        build_method("multifair_adam", {"group_fusion": fusion}, ["a", "b"], G, n_classes=K)
    build_method("multifair_adam", {"group_fusion": fusion}, ["a", "b"], G, n_classes=2)
    readme = {"levels": "validation", "group_weights": "validation", "unimodal_weight": 1.0}
    build_method("multifair_adam", readme, ["a", "b"], G, n_classes=K)
