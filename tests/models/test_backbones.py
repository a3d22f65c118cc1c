"""Standard backbones: shapes per backbone and size, a whole model on each, and loading weights files
in torchvision, timm, MONAI and MedFusion layouts (written here from random weights: nothing is downloaded)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from medfusion.config import ConfigError, ModelConfig
from medfusion.models import create_model
from medfusion.models.backbones import ImageWeightsError, build_image_encoder, load_image_weights

BACKBONES = ("medfusion", "densenet121", "resnet18", "resnet50")
# Parameters of the 3-channel trunks, torchvision's counts without the classifier: the same architectures.
TORCHVISION_TRUNK_PARAMS = {"densenet121": 6_953_856, "resnet18": 11_176_512, "resnet50": 23_508_032}


def encoder(backbone: str, in_channels: int = 1, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_image_encoder(ModelConfig(backbone=backbone, in_channels=in_channels)).eval()


def reference_state(backbone: str, layout: str = "torchvision", seed: int = 1) -> dict[str, Tensor]:
    """A 3-channel, 1000-class network's state dict with random weights, keyed as `layout` keys it.

    MONAI's DenseNet nests each dense layer's modules under `.layers`; torchvision (and timm) name
    them directly, and checkpoints older than torchvision 0.3 as `norm.1`, `conv.2`."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(seed)
    if backbone == "densenet121":
        net = DenseNet121(spatial_dims=2, in_channels=3, out_channels=1000)
        state = {k: v.clone() for k, v in net.state_dict().items()}
        if layout == "monai":
            return state
        state = {re.sub(r"\.layers\.", ".", k): v for k, v in state.items() if not k.startswith("class_layers.")}
        state |= {"classifier.weight": torch.randn(1000, 1024), "classifier.bias": torch.randn(1000)}
        if layout == "torchvision_old":
            state = {re.sub(r"(denselayer\d+)\.(norm|conv)([12])\.", r"\1.\2.\3.", k): v for k, v in state.items()}
            state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        return state
    trunk = encoder(backbone, in_channels=3, seed=seed).trunk
    channels = {"resnet18": 512, "resnet50": 2048}[backbone]
    return {**{k: v.clone() for k, v in trunk.state_dict().items()}, "fc.weight": torch.randn(1000, channels)}


def save(state: dict[str, Tensor], path) -> str:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return str(path)


def assert_loaded(enc: torch.nn.Module, state: dict[str, Tensor], prefix: str = "trunk.") -> None:
    """Every tensor of the encoder's trunk equals the file's (the RGB first conv summed to grey)."""
    own = enc.state_dict()
    by_name = {re.sub(r"(denselayer\d+)\.(norm|conv)\.([12])\.", r"\1.\2\3.", k): v for k, v in state.items()}
    by_name = {re.sub(r"\.layers\.", ".", k): v for k, v in by_name.items()}
    checked = 0
    for key, value in own.items():
        if not key.startswith(prefix) or key.endswith("num_batches_tracked"):
            continue
        expected = by_name[re.sub(r"\.layers\.", ".", key.removeprefix(prefix))]
        if expected.shape != value.shape:  # first conv: 3 input channels in the file, 1 here
            torch.testing.assert_close(value, expected.sum(dim=1, keepdim=True))
        else:
            assert torch.equal(value, expected), key
        checked += 1
    assert checked > 50


@pytest.mark.parametrize(
    "backbone, size, grid",
    [
        ("medfusion", 64, 8),
        ("medfusion", 256, 32),
        ("densenet121", 64, 2),
        ("densenet121", 256, 8),
        ("resnet18", 64, 2),
        ("resnet18", 256, 8),
        ("resnet50", 64, 2),
        ("resnet50", 256, 8),
    ],
)
def test_forward_shapes(backbone, size, grid):
    enc = encoder(backbone)
    with torch.no_grad():
        features = enc(torch.randn(2, 1, size, size))
    dim = ModelConfig().hidden_dim
    assert features.grid == (grid, grid)
    assert features.regions.shape == (2, grid * grid, dim)
    assert features.pooled.shape == (2, dim)
    assert features.attention.shape == (2, grid * grid)
    torch.testing.assert_close(features.attention.sum(-1), torch.ones(2))


@pytest.mark.parametrize("backbone", sorted(TORCHVISION_TRUNK_PARAMS))
def test_trunks_are_torchvision_architectures(backbone):
    trunk = encoder(backbone, in_channels=3).trunk
    assert sum(p.numel() for p in trunk.parameters()) == TORCHVISION_TRUNK_PARAMS[backbone]
    with torch.no_grad():  # a 3-channel trunk takes the grey image repeated
        assert encoder(backbone, in_channels=3)(torch.randn(1, 1, 64, 64)).grid == (2, 2)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_model_on_each_backbone_trains(synth_data, backbone):
    torch.manual_seed(0)
    batch = synth_data.batch(0, 4)
    model = create_model("medfusion_tiny", len(synth_data.tokenizer), len(synth_data.classes), backbone=backbone)
    out = model(batch)
    total, parts = model.loss(batch, out)
    total.backward()
    assert torch.isfinite(total) and {"cls", "box", "text"} <= set(parts)
    grads = [p.grad for p in model.image_encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "backbone, layout, suffix",
    [
        ("densenet121", "torchvision", ".safetensors"),
        ("densenet121", "torchvision", ".pth"),
        ("densenet121", "torchvision_old", ".pth"),
        ("densenet121", "monai", ".pt"),
        ("resnet18", "torchvision", ".safetensors"),
        ("resnet50", "torchvision", ".bin"),
    ],
)
def test_loads_weights_files(tmp_path, backbone, layout, suffix):
    state = reference_state(backbone, layout)
    uri = save(state, tmp_path / f"weights{suffix}")
    enc = encoder(backbone)
    region_proj = enc.region_proj.weight.detach().clone()
    load_image_weights(enc, uri)
    assert_loaded(enc, state)
    torch.testing.assert_close(enc.region_proj.weight, region_proj)  # not in the file: keeps its init


def test_loads_wrapped_and_nested_checkpoints(tmp_path):
    state = reference_state("resnet18")
    uri = save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    enc = encoder("resnet18")
    load_image_weights(enc, uri)
    assert_loaded(enc, state)


@pytest.mark.parametrize("backbone", ["medfusion", "resnet18"])
def test_loads_a_medfusion_models_encoder_whole(tmp_path, backbone):
    source = create_model("medfusion_tiny", 50, 3, backbone=backbone)
    uri = save(source.state_dict(), tmp_path / "model.safetensors")
    enc = build_image_encoder(source.config)
    load_image_weights(enc, uri)
    for key, value in source.image_encoder.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[key], value, rtol=0, atol=0)


def test_missing_file_names_the_uri(tmp_path):
    uri = str(tmp_path / "nowhere" / "densenet121.safetensors")
    with pytest.raises(FileNotFoundError, match=re.escape(uri)):
        load_image_weights(encoder("resnet18"), uri)


def test_unreadable_file_names_the_uri(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ImageWeightsError, match=re.escape(str(path))):
        load_image_weights(encoder("resnet18"), str(path))


def test_mismatched_keys_are_listed(tmp_path):
    state = reference_state("resnet18")
    del state["layer4.1.bn2.weight"], state["layer4.1.bn2.bias"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    uri = save(state, tmp_path / "weights.safetensors")
    with pytest.raises(ImageWeightsError) as err:
        load_image_weights(encoder("resnet18"), uri)
    message = str(err.value)
    assert uri in message and "backbone resnet18" in message
    assert "2 missing keys (trunk.layer4.1.bn2.weight, trunk.layer4.1.bn2.bias)" in message
    assert "1 unexpected keys (layer5.0.conv1.weight)" in message


def test_wrong_architecture_lists_a_count(tmp_path):
    uri = save(reference_state("densenet121"), tmp_path / "densenet121.safetensors")
    with pytest.raises(ImageWeightsError, match=r"missing keys \(trunk\.conv1\.weight, .*\.\.\. and \d+ more\)"):
        load_image_weights(encoder("resnet18"), uri)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    state = reference_state("densenet121")
    state["features.norm0.weight"] = torch.ones(32)
    uri = save(state, tmp_path / "weights.pt")
    with pytest.raises(ImageWeightsError, match=re.escape("features.norm0.weight: file (32,), model (64,)")):
        load_image_weights(encoder("densenet121"), uri)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("backbone", "vgg16", "model.backbone: must be one of medfusion, densenet121, resnet18, resnet50"),
        ("image_init_uri", "s3://weights/densenet.onnx", "model.image_init_uri: must name a .safetensors"),
    ],
)
def test_config_validation(field, value, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        ModelConfig(**{field: value})
