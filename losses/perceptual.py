"""The VGG-19 perceptual loss of pix2pixHD and SPADE, from a local weights file (never downloaded).

L = sum_i w_i * L1(phi_i(fake), phi_i(real)), phi_i the ImageNet VGG-19 activations relu1_1, relu2_1,
relu3_1, relu4_1, relu5_1 with w = (1/32, 1/16, 1/8, 1/4, 1); grey images in [-1, 1] are repeated to RGB and
normalised as ImageNet inputs. Only the ``features.*`` tensors of torchvision's state dict are read.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models.vgg import cfgs, make_layers

# The perceptual loss's network, from torchvision (ImageNet weights): a file the user provides, never downloaded
# (python -m utils.evaluation.weights fetch vgg19, on a machine with internet).
from utils.evaluation.weights import VGG19_FILE, VGG19_URL

LAYER_ENDS = (2, 7, 12, 21, 30)  # features[:2] ends at relu1_1, ..., features[:30] at relu5_1
LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def vgg19_features(path: str | Path, key: str = "perceptual weights") -> torch.nn.Sequential:
    """VGG-19's convolutional part up to relu5_1, frozen and in eval mode, from torchvision's state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} not found; it must be torchvision's ImageNet VGG-19 state dict "
                                f"({VGG19_FILE}, from {VGG19_URL}; copy it here from a machine with internet)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = make_layers(cfgs["E"])
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
    return features[: LAYER_ENDS[-1]].eval().requires_grad_(False)


class PerceptualLoss:
    """A plain object, not a submodule: the frozen 20 M-parameter network stays out of the checkpoint (generation
    does not need it) and follows its inputs to their device on first use."""

    def __init__(self, features: torch.nn.Sequential):
        self.features = features
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        rgb01 = ((x.float() + 1) / 2).expand(-1, 3, -1, -1)
        h, out, start = (rgb01 - self.mean.to(x.device)) / self.std.to(x.device), [], 0
        for end in LAYER_ENDS:
            h = self.features[start:end](h)
            out.append(h)
            start = end
        return out

    def __call__(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """fake, real (B, 1, H, W) in [-1, 1]; the loss is a float32 scalar with a gradient into ``fake``."""
        self.features.to(fake.device)
        with torch.no_grad():
            targets = self.activations(real)
        return sum(w * F.l1_loss(f.float(), r.float()) for w, f, r in
                   zip(LAYER_WEIGHTS, self.activations(fake), targets))
