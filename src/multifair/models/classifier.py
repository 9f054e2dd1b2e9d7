"""`MultimodalClassifier`: the model of method.md section 2.

    x_i --f_i--> (B, F_i) --proj_i--> h_i (B, d)              encoder, Linear -> LayerNorm -> Dropout
    [h_1 .. h_M] (B, M, d) --fusion--> (B, d) --head--> z       attention (or concat), MLP head
    C_i(stopgrad(h_i)) -> u_i                                  auxiliary heads, training signals only

The model states which parameters belong to which modality (`modality_parameters`): exactly
the encoders f_i. Projections, fusion, head and auxiliary heads are the rest. Nothing here or
anywhere else matches parameter names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from multifair.errors import UserError
from multifair.models.encoders import Encoder
from multifair.models.fusion import FUSIONS, MLPHead, build_fusion

if TYPE_CHECKING:
    from multifair.methods.base import ModelOutput

# A modality's presence in `fuse`: a Python bool for the whole batch, or a (B,) tensor
# (bool: keep/zero per sample; float: a per-sample weight on the token).
Presence = bool | Tensor


class MultimodalClassifier(nn.Module):
    """Encoder per modality -> projection to d -> fusion over modality tokens -> head (+ C_i)."""

    def __init__(
        self,
        encoders: Mapping[str, Encoder],
        dim: int = 128,
        fusion: str = "attention",
        heads: int = 4,
        layers: int = 2,
        dropout: float = 0.1,
        n_classes: int = 2,
        missing: bool = False,
    ) -> None:
        super().__init__()
        if not encoders:
            raise UserError("the model needs at least one modality")
        if fusion not in FUSIONS:
            raise UserError(f"model.fusion: {fusion!r} not found. Available: {list(FUSIONS)}")
        if fusion == "attention" and dim % heads:
            raise UserError(f"model.dim: {dim} is not divisible by model.heads={heads}")
        self.modalities: list[str] = list(encoders)
        self.n_classes = n_classes
        self.dim = dim
        self.fusion_name = fusion
        try:
            self.encoders = nn.ModuleDict(encoders)
            self.projections = nn.ModuleDict(
                {
                    m: nn.Sequential(
                        nn.Linear(enc.out_dim, dim), nn.LayerNorm(dim), nn.Dropout(dropout)
                    )
                    for m, enc in encoders.items()
                }
            )
            self.aux_heads = nn.ModuleDict(
                {
                    m: MLPHead(dim, n_classes, activation="relu", dropout=dropout, norm=False)
                    for m in encoders
                }
            )
        except (KeyError, TypeError) as exc:
            raise UserError(
                f"modality names {self.modalities} cannot all be used as module keys ({exc}); "
                f"rename the modality (no '.', not a torch.nn.Module attribute)"
            ) from None
        self.fusion = build_fusion(fusion, dim, len(self.modalities), heads, layers, dropout)
        self.head = MLPHead(dim, n_classes, activation="gelu", dropout=dropout, norm=True)
        # Learned per-modality "missing" token e_m (M, d), for data with missing modalities
        # (`data.missing_modalities: mask`): it replaces an absent modality's token, so the
        # placeholder the encoder ran on never reaches fusion. Created last and from zeros,
        # so the other parameters' initialisation is the same with or without it.
        self.missing_tokens = (
            nn.Parameter(torch.zeros(len(self.modalities), dim)) if missing else None
        )

    # ---- forward ---------------------------------------------------------------------------
    def encode(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """h_i = proj_i(f_i(x_i)) for every modality: {modality: (B, d)}.

        With missing modalities (`batch["present"]`), a tensor modality's encoder runs on the
        samples that have it only, so a placeholder never enters a batch statistic
        (BatchNorm) of the samples that do; an absent sample's row is zero (`fuse` replaces it
        with the learned missing token)."""
        features: dict[str, Tensor] = {}
        present = batch.get("present") or {}
        for m in self.modalities:
            if m not in batch:
                raise UserError(
                    f"the batch has no entry for modality {m!r} (batch keys: {sorted(batch)})"
                )
            x = batch[m]
            if m in present and isinstance(x, Tensor):
                features[m] = self._encode_present(m, x, present[m])
            else:
                features[m] = self.projections[m](self.encoders[m](x))  # (B, d)
        return features

    def _encode_present(self, m: str, x: Tensor, have: Tensor) -> Tensor:
        # one host sync per modality, on data with missing modalities only; a batch where no
        # sample has m runs the encoder on zero rows (its parameters stay in the graph: DDP)
        idx = have.to(device=x.device, dtype=torch.bool).nonzero().squeeze(1)
        h = self.projections[m](self.encoders[m](x.index_select(0, idx)))  # (n, d)
        return h.new_zeros((x.shape[0], h.shape[1])).index_copy(0, idx, h)  # (B, d)

    def fuse(
        self,
        features: Mapping[str, Tensor],
        present: Mapping[str, Presence] | None = None,
        available: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Fusion + head on the modality tokens -> (head_input (B, d), logits (B, C)).

        `present[m]` zeroes modality m's token (False, or a (B,) bool tensor False per sample,
        or a (B,) float weight), so methods can re-run fusion and head with modalities removed
        (unimodal estimates, DGL, PMR) without a host sync. Missing keys mean present.

        `available[m]` (B,) bool is the DATA's presence (batch["present"]): where False the
        token is replaced by the learned missing embedding and attention does not read it
        (models/fusion.py), so whatever placeholder the encoder ran on has no effect.
        """
        if present is not None:
            unknown = set(present) - set(self.modalities)
            if unknown:
                raise KeyError(f"present: unknown modalities {sorted(unknown)}")
        tokens = []
        absent = []
        for i, m in enumerate(self.modalities):
            h = features[m]  # (B, d)
            if available is not None and m in available:
                have = available[m].to(device=h.device, dtype=torch.bool)  # (B,)
                filler = (
                    self.missing_tokens[i].to(h.dtype)
                    if self.missing_tokens is not None
                    else torch.zeros((), dtype=h.dtype, device=h.device)
                )
                h = torch.where(have[:, None], h, filler)
                absent.append(~have)
            else:
                absent.append(torch.zeros(h.shape[0], dtype=torch.bool, device=h.device))
            if present is not None and m in present:
                h = _apply_presence(h, present[m])
            tokens.append(h)
        mask = torch.stack(absent, dim=1) if available is not None else None  # (B, M)
        fused = self.fusion(torch.stack(tokens, dim=1), mask)  # (B, M, d) -> (B, d)
        head_input = self.head.body(fused)  # (B, d)
        return head_input, self.head.out(head_input)  # (B, d), (B, C)

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        # Imported here: multifair.methods imports method modules that may import this one.
        from multifair.methods.base import ModelOutput

        features = self.encode(batch)
        head_input, logits = self.fuse(features, available=batch.get("present"))
        # C_i sees detached features: the auxiliary loss trains only C_i, never f_i.
        aux_logits = {m: self.aux_heads[m](h.detach()) for m, h in features.items()}
        return ModelOutput(logits, features, aux_logits, head_input)

    # ---- layers methods read ---------------------------------------------------------------
    def aux_last_layer(self, modality: str) -> nn.Linear:
        """C_i's last linear layer (its weight gradient g_i is the alignment signal)."""
        return self.aux_heads[modality].out

    def head_last_layer(self) -> nn.Linear:
        """The fused head's last linear layer (g_F); its input is `ModelOutput.head_input`."""
        return self.head.out

    # ---- parameter ownership ---------------------------------------------------------------
    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Encoder parameters f_i per modality (for OCT: slice encoder, slice position
        embedding and slice aggregator). Frozen ones are included (requires_grad False)."""
        return {m: list(self.encoders[m].parameters()) for m in self.modalities}

    def aux_parameters(self) -> list[nn.Parameter]:
        """The auxiliary heads C_i (trained by the auxiliary loss only)."""
        return list(self.aux_heads.parameters())

    def other_parameters(self) -> list[nn.Parameter]:
        """Projections, fusion and head: everything that is neither f_i nor C_i."""
        taken = {id(p) for ps in self.modality_parameters().values() for p in ps}
        taken |= {id(p) for p in self.aux_parameters()}  # missing_tokens: here, with fusion
        return [p for p in self.parameters() if id(p) not in taken]


def _apply_presence(h: Tensor, present: Presence) -> Tensor:
    if isinstance(present, Tensor):
        if present.dim() == 1:
            present = present.unsqueeze(1)  # (B, 1) against (B, d)
        if present.dtype == torch.bool:
            return torch.where(present, h, torch.zeros((), dtype=h.dtype, device=h.device))
        return h * present.to(h.dtype)
    return h if present else torch.zeros_like(h)
