"""One modality only: the model is built with that modality's encoder alone, trained with ERM.

The reference point for modality imbalance: what each modality reaches on its own.
"""

from __future__ import annotations

from pydantic import Field

from multifair.errors import UserError
from multifair.methods.base import METHODS, Method, MethodParams


class UnimodalParams(MethodParams):
    modality: str | None = Field(
        None, description="the modality to train on (None: the dataset's first modality)"
    )


@METHODS.register("unimodal")
class Unimodal(Method):
    """ERM on a model built with `params.modality` only (see `model_modalities`)."""

    Params = UnimodalParams
    params: UnimodalParams

    @classmethod
    def model_modalities(cls, params: MethodParams, modalities: list[str]) -> list[str]:
        """[params.modality]; the trainer builds the model with that modality only."""
        assert isinstance(params, UnimodalParams)
        if not modalities:
            raise UserError("method 'unimodal': the dataset has no modalities")
        if params.modality is None:
            return [modalities[0]]
        if params.modality not in modalities:
            raise UserError(
                f"method 'unimodal': modality {params.modality!r} not found. "
                f"Available: {list(modalities)}"
            )
        return [params.modality]

    def __init__(self, params: UnimodalParams, modalities: list[str], n_groups: int) -> None:
        # Accepts either the dataset's modalities or the model's (already reduced) list.
        super().__init__(params, self.model_modalities(params, modalities), n_groups)
