"""The MedFusion model (arXiv 2405.17459): encoders, fusion, heads, and the registry of variants.

Imports torch and nothing heavier; building a model does no I/O. Library layer: everything above
may import it (`build_model`, `create_model` and the module classes are its public names); it imports
only `medfusion.config` and `medfusion.loader`.
"""

from medfusion.models.boxes import cxcywh_to_xyxy, paired_giou, paired_iou, xyxy_to_cxcywh
from medfusion.models.decoder import FindingsDecoder
from medfusion.models.fusion import build_fusion
from medfusion.models.heads import (
    BoxHead,
    BoxOutput,
    BoxRefiner,
    ClassificationHead,
    box_losses,
    classification_loss,
    text_loss,
)
from medfusion.models.image_encoder import ImageEncoder, ImageFeatures
from medfusion.models.model import (
    PLACE_DIM,
    MedFusionModel,
    build_model,
    count_parameters,
    decoder_regions,
    finding_boxes,
    place_features,
    to_tensors,
)
from medfusion.models.registry import MODEL_REGISTRY, create_model, list_models, preset_config, register_model
from medfusion.models.text_encoder import NoteEncoder, NoteFeatures

__all__ = [
    "MODEL_REGISTRY",
    "PLACE_DIM",
    "BoxHead",
    "BoxOutput",
    "BoxRefiner",
    "ClassificationHead",
    "FindingsDecoder",
    "ImageEncoder",
    "ImageFeatures",
    "MedFusionModel",
    "NoteEncoder",
    "NoteFeatures",
    "box_losses",
    "build_fusion",
    "build_model",
    "classification_loss",
    "count_parameters",
    "create_model",
    "cxcywh_to_xyxy",
    "decoder_regions",
    "list_models",
    "paired_giou",
    "paired_iou",
    "place_features",
    "preset_config",
    "register_model",
    "text_loss",
    "finding_boxes",
    "to_tensors",
    "xyxy_to_cxcywh",
]
