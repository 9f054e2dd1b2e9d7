"""Checkpoints leave frozen parameters out (they are rebuilt from their source) and check them
against the digest recorded at save time when loading."""

from __future__ import annotations

import pytest
import torch

from multifair.data.bundle import ModalitySpec
from multifair.errors import UserError
from multifair.models import build_model
from multifair.training import checkpoint

SPECS = {
    "labs": ModalitySpec("labs", "tabular", (6,), 6, (6,), "float32"),
    "vitals": ModalitySpec("vitals", "tabular", (4,), 4, (4,), "float32"),
}


def frozen_model(seed: int, frozen_seed: int | None = None) -> torch.nn.Module:
    """A small model whose `labs` encoder is frozen (like a frozen pretrained text encoder)."""
    torch.manual_seed(seed)
    model = build_model({"preset": "small", "dim": 8, "heads": 2, "layers": 1}, SPECS)
    if frozen_seed is not None:  # "pretrained" weights from another source
        torch.manual_seed(frozen_seed)
        for p in model.encoders["labs"].parameters():
            p.data.normal_()
    model.encoders["labs"].requires_grad_(False)
    return model


def test_frozen_parameters_are_left_out_and_checked_on_load(tmp_path):
    trained = frozen_model(seed=0, frozen_seed=7)
    frozen = checkpoint.frozen_signature(trained)
    labs = {n for n, _ in trained.named_parameters() if n.startswith("encoders.labs.")}
    assert labs and set(frozen["keys"]) == labs
    with torch.no_grad():  # "training" moves the trainable weights only
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(1.0)
    path = tmp_path / "best.pt"
    checkpoint.save_atomic(
        {"format": checkpoint.FORMAT_VERSION, **checkpoint.model_state(trained, frozen)}, path
    )
    ckpt = checkpoint.load(path)
    assert not labs & set(ckpt["model"])  # the frozen weights are not stored

    rebuilt = frozen_model(seed=1, frozen_seed=7)  # same frozen source, other trainable init
    checkpoint.load_model(rebuilt, ckpt, path)
    for (name, a), (_, b) in zip(trained.state_dict().items(), rebuilt.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)

    with pytest.raises(UserError, match=r"frozen weights .* differ from those the run was trained"):
        checkpoint.load_model(frozen_model(seed=1, frozen_seed=8), ckpt, path)


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    model = frozen_model(seed=0)
    ckpt = checkpoint.model_state(model, checkpoint.frozen_signature(model))
    del ckpt["model"]["aux_heads.labs.out.bias"]
    with pytest.raises(
        UserError, match=r"does not fit this model \(missing \[.aux_heads.labs.out.bias.\]"
    ):
        checkpoint.load_model(frozen_model(seed=0), ckpt, "x.pt")


def test_checkpoints_without_frozen_parameters_load_strictly(tmp_path):
    torch.manual_seed(0)
    model = build_model({"preset": "small", "dim": 8, "heads": 2, "layers": 1}, SPECS)
    ckpt = checkpoint.model_state(model, checkpoint.frozen_signature(model))
    assert ckpt["frozen"] == {"keys": [], "sha256": ""}
    assert ckpt["model"].keys() == model.state_dict().keys()
    torch.manual_seed(1)
    other = build_model({"preset": "small", "dim": 8, "heads": 2, "layers": 1}, SPECS)
    checkpoint.load_model(other, {"model": ckpt["model"]}, "old.pt")  # no "frozen" entry
    torch.testing.assert_close(other.state_dict(), model.state_dict())
