"""Standard image backbones for MedFusion, and starting one from a user's weights file.

DenseNet-121 (Huang et al., arXiv 1608.06993), the architecture of CheXNet (Rajpurkar et al., arXiv
1711.05225), and ResNet-18/50 (He et al., arXiv 1512.03385), all as MONAI's 2-D networks laid out like
torchvision's. The last feature map (before pooling and classifier; stride 32, so 8x8 cells at 256 px)
becomes the regions the fusion, the box head and the findings decoder attend over, through the same
`grid_features` as the paper's CNN: so `build_image_encoder(cfg)` returns a drop-in image encoder.

`load_image_weights(encoder, uri)` fills an encoder from a safetensors file or a torch state dict in
torchvision, timm or MONAI key layout (or a MedFusion model's own), read through medfusion.storage:
nothing is downloaded. The classifier is dropped; 3-channel (RGB) first-conv weights are summed over
their input channels for the 1-channel grey input, which is exactly the CheXNet convention of feeding
the grey film repeated three times, at a third of the first layer's cost.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from medfusion import storage
from medfusion.config import ModelConfig
from medfusion.models.image_encoder import AdditiveAttentionPool, ImageEncoder, ImageFeatures, grid_features

# Channels of each backbone's last feature map.
BACKBONE_CHANNELS = {"densenet121": 1024, "resnet18": 512, "resnet50": 2048}
# Keys of classifier heads in the layouts we read (torchvision/timm densenet: classifier, resnet: fc;
# MONAI densenet: class_layers); an image encoder has no use for them.
HEAD_PREFIXES = ("classifier.", "fc.", "class_layers.", "head.", "last_linear.")
# Wrappers around a whole state dict (DataParallel, Lightning, torch.compile...), stripped when every key has one.
WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.")
# Nested checkpoints: {"state_dict": {...}, "epoch": ...}.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")
MEDFUSION_PREFIX = "image_encoder."  # the encoder's keys inside a MedFusion model (an export's model.safetensors)
SHOWN_KEYS = 10  # keys listed in an error message before "... and N more"


class ImageWeightsError(ValueError):
    """A weights file does not fit the image encoder; the message names the file and the keys."""


class DenseNetTrunk(nn.Module):
    """MONAI's 2-D DenseNet-121 up to its last norm, with the ReLU torchvision applies after it."""

    architecture = "densenet121"

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        from monai.networks.nets import DenseNet121  # MONAI takes seconds to import: only when used

        self.features = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1).features

    def forward(self, image: Tensor) -> Tensor:
        return torch.relu(self.features(image))  # (B, 1024, S/32, S/32)


class ResNetTrunk(nn.Module):
    """MONAI's 2-D ResNet (torchvision's stem: 7x7 stride 2 then max pool) up to layer4, no pooling."""

    def __init__(self, depth: int, in_channels: int) -> None:
        super().__init__()
        self.architecture = f"resnet{depth}"
        from monai.networks.nets import ResNet
        from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

        block, layers = {18: (ResNetBlock, [2, 2, 2, 2]), 50: (ResNetBottleneck, [3, 4, 6, 3])}[depth]
        net = ResNet(
            block,
            layers,
            [64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type="B",
            bias_downsample=False,  # torchvision's 1x1 downsample convolutions have no bias
            feed_forward=False,
        )
        # The modules themselves, so the keys read conv1.weight, layer1.0.bn1.weight... as torchvision's do.
        self.conv1, self.bn1, self.act, self.maxpool = net.conv1, net.bn1, net.act, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, image: Tensor) -> Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(image))))  # (B, 64, S/4, S/4)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, C, S/32, S/32)


class BackboneEncoder(nn.Module):
    """A standard CNN trunk -> ImageFeatures, like ImageEncoder's.

    Args:
        trunk: image (B, in_channels, S, S) -> feature map (B, channels, h, w).
        in_channels: the trunk's input channels; a grey image is repeated for a 3-channel trunk.
        channels: of the trunk's feature map.
        out_dim: width D of the region features and the pooled vector.
        dropout: dropout on the region features.
    """

    trunk_prefix = "trunk."  # where a backbone file's keys go in this module's state dict

    def __init__(self, trunk: nn.Module, in_channels: int, channels: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.trunk = trunk
        self.in_channels = in_channels
        self.region_proj = nn.Linear(channels + 2, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.pool = AdditiveAttentionPool(out_dim)

    def forward(self, image: Tensor) -> ImageFeatures:
        if image.shape[1] == 1 and self.in_channels == 3:
            image = image.expand(-1, 3, -1, -1)
        return grid_features(self.trunk(image), self.region_proj, self.dropout, self.pool)


def build_image_encoder(cfg: ModelConfig) -> nn.Module:
    """The image encoder `cfg.backbone` names, with random weights (see load_image_weights)."""
    if cfg.backbone == "medfusion":
        widths, dim = list(cfg.cnn_widths), cfg.hidden_dim
        return ImageEncoder(cfg.in_channels, widths, cfg.cnn_blocks, dim, cfg.dropout, stem_stride=cfg.stem_stride)
    if cfg.backbone == "densenet121":
        trunk: nn.Module = DenseNetTrunk(cfg.in_channels)
    elif cfg.backbone in ("resnet18", "resnet50"):
        trunk = ResNetTrunk(int(cfg.backbone.removeprefix("resnet")), cfg.in_channels)
    else:
        raise ValueError(f"model.backbone: unknown backbone {cfg.backbone!r}")
    return BackboneEncoder(trunk, cfg.in_channels, BACKBONE_CHANNELS[cfg.backbone], cfg.hidden_dim, cfg.dropout)


# --------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------


def read_state_dict(uri: str) -> dict[str, Tensor]:
    """The tensors of a .safetensors file or a torch state dict (weights_only), local or s3://."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"model.image_init_uri: {err}") from None
    try:
        if uri.lower().endswith(".safetensors"):
            from safetensors.torch import load

            loaded: object = load(data)
        else:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # whatever the parser's complaint, the user's fix is the same: another file
        raise ImageWeightsError(f"{uri}: not a readable safetensors file or torch state dict ({err})") from None
    while isinstance(loaded, Mapping):
        nested = next((loaded[k] for k in NESTED_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if nested is None:
            break
        loaded = nested
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, Tensor)} if isinstance(loaded, Mapping) else {}
    if not tensors:
        raise ImageWeightsError(f"{uri}: holds no tensors (expected a state dict of the image backbone)")
    return tensors


def canonical_key(key: str) -> str:
    """One spelling for the layouts' names of the same tensor: MONAI's `denselayerN.layers.norm1` and
    old torchvision's `denselayerN.norm.1` both become torchvision's `denselayerN.norm1`."""
    key = re.sub(r"(denselayer\d+)\.layers\.", r"\1.", key)
    return re.sub(r"(denselayer\d+)\.(norm|relu|conv)\.([12])\.", r"\1.\2\3.", key)


def _strip_wrappers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    if any(k.startswith(MEDFUSION_PREFIX) for k in state):  # a whole MedFusion model: its encoder's part
        return {k.removeprefix(MEDFUSION_PREFIX): v for k, v in state.items() if k.startswith(MEDFUSION_PREFIX)}
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state, stripped = {k.removeprefix(prefix): v for k, v in state.items()}, True
    return {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}


def _fit_first_conv(value: Tensor, target: Tensor) -> Tensor | None:
    """RGB first-conv weights for a grey input (summed over colour), or grey for RGB (spread evenly)."""
    if value.ndim != 4 or value.shape[0] != target.shape[0] or value.shape[2:] != target.shape[2:]:
        return None
    if value.shape[1] == 3 and target.shape[1] == 1:
        return value.sum(dim=1, keepdim=True)
    if value.shape[1] == 1 and target.shape[1] == 3:
        return value.expand(-1, 3, -1, -1) / 3
    return None


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f"{shown}, ... and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else shown


def load_image_weights(encoder: nn.Module, uri: str) -> None:
    """Fill `encoder` (from build_image_encoder) with the weights file at `uri`.

    Every tensor of the backbone must be in the file (BatchNorm's num_batches_tracked may be absent);
    the encoder's own projection and pooling (region_proj, pool) are taken when the file has them (a
    MedFusion model's), else keep their initialization. Classifier keys are dropped.

    Raises:
        FileNotFoundError: no file at `uri` (the message names it).
        ImageWeightsError: unreadable file, or keys or shapes that do not fit; the message lists the
            missing keys (the first few and a count), the unexpected ones and each shape mismatch.
    """
    state = _strip_wrappers(read_state_dict(uri))
    own = encoder.state_dict()
    prefix = getattr(encoder, "trunk_prefix", "")
    by_canonical = {canonical_key(k): k for k in own}
    mapped: dict[str, Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in state.items():
        target = key if key in own else by_canonical.get(canonical_key(prefix + key))
        if target is None:
            unexpected.append(key)
            continue
        if value.shape != own[target].shape:
            fitted = _fit_first_conv(value, own[target])
            if fitted is None:
                mismatched.append(f"{key}: file {tuple(value.shape)}, model {tuple(own[target].shape)}")
                continue
            value = fitted
        mapped[target] = value
    required = [k for k in own if not k.startswith(("region_proj.", "pool.")) and not k.endswith("num_batches_tracked")]
    missing = [k for k in required if k not in mapped]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_listed(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_listed(unexpected)})")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches ({_listed(mismatched)})")
        backbone = getattr(getattr(encoder, "trunk", None), "architecture", "medfusion")
        raise ImageWeightsError(f"model.image_init_uri {uri}: does not fit backbone {backbone}: " + "; ".join(problems))
    encoder.load_state_dict({**own, **mapped}, strict=True)
