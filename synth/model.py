"""The one CNN every experiment trains: airbench94's network, width-scalable, for small images.

Architecture (after KellerJordan/cifar10-airbench, ``airbench94.py``: 94.01% mean CIFAR-10 test
accuracy over 1,000 runs in 3.83 s on an A100), for a (B, 3, 32, 32) batch at ``width=1``:

    normalise    (x - CIFAR mean) / CIFAR std                              (B, 3, 32, 32)
    whiten       2x2 conv, no padding, 24 channels, GELU; weights set      (B, 24, 31, 31)
                 once from the data's patch covariance, then frozen
    block 1      conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU (B, 64, 15, 15)
    block 2      same, 256 channels                                        (B, 256, 7, 7)
    block 3      same, 256 channels                                        (B, 256, 3, 3)
    head         global max-pool -> linear (no bias) -> x 1/9              (B, num_classes)

Why these pieces: every 3x3 conv starts as an identity (Dirac) map, so each block's second conv
is an implicit residual connection and the net trains fast without skip wiring; BatchNorm keeps
its scale fixed at 1 (only the bias learns, with a 64x learning rate, see ``synth.recipe``); the
logit scale 1/9 is a fixed temperature that keeps early softmax outputs soft.

Parameters (``count_parameters``), roughly quadratic in ``width``:
    width 1.0,   10 classes: 1,972,792 (1,971,352 trainable; frozen: 288 whitening weights and
                             1,152 BatchNorm scales)
    width 1.0,    6 classes: 1,971,768
    width 0.5,   10 classes:   498,104
    width 0.125,  6 classes:    33,048 (the CPU test size)

The model takes float images in [0, 1], (B, 3, H, W); normalisation happens inside, so saved
weights are all a caller needs for inference (:func:`load_model`, then :func:`synth.recipe.logits`).
"""

from __future__ import annotations

import io
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE_NAME = "airbench94-resnetish"
# Bump when a change makes old weights load into a different function (the signature checks it).
ARCHITECTURE_VERSION = 1
BASE_WIDTHS = (64, 256, 256)
WHITEN_KERNEL = 2
BATCHNORM_MOMENTUM = 0.6  # airbench's convention: weight of the running mean kept each step
LOGIT_SCALE = 1.0 / 9.0

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class ArchitectureMismatchError(ValueError):
    """Weights or a checkpoint were made for a different network than the one being built."""


def architecture(num_classes: int, width: float = 1.0) -> dict:
    """The signature of the network: everything that decides which weights fit it.

    Stored with every checkpoint and model file and compared on load, so weights from another
    width or class count fail loudly instead of half-loading.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be at least 1")
    widths = [max(1, int(round(w * width))) for w in BASE_WIDTHS]
    return {
        "name": ARCHITECTURE_NAME,
        "version": ARCHITECTURE_VERSION,
        "width": float(width),
        "widths": widths,
        "whiten_kernel": WHITEN_KERNEL,
        "num_classes": int(num_classes),
    }


def check_architecture(expected: dict, found: Optional[dict], what: str) -> None:
    """Raise :class:`ArchitectureMismatchError` naming every field where ``found`` differs."""
    if found is None:
        raise ArchitectureMismatchError(f"{what} carries no architecture signature; it was not written by synth")
    keys = sorted(set(expected) | set(found))
    diffs = [f"{k}: {found.get(k)!r} there, {expected.get(k)!r} here" for k in keys if found.get(k) != expected.get(k)]
    if diffs:
        raise ArchitectureMismatchError(
            f"{what} was made for a different network ({'; '.join(diffs)}). Fix: use the same "
            "train.width and class list, or start a new run name (or delete the old checkpoints)"
        )


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm with the scale frozen at 1: only the bias (shift) is learned."""

    def __init__(self, channels: int):
        # PyTorch's momentum is the weight of the *new* statistic: 1 - airbench's 0.6.
        super().__init__(channels, eps=1e-12, momentum=1.0 - BATCHNORM_MOMENTUM)
        self.weight.requires_grad_(False)


class Conv(nn.Conv2d):
    """A bias-free 3x3 'same' conv initialised as identity plus noise: an implicit residual."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__(channels_in, channels_out, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # The first min(in, out) output channels copy their input channel at init.
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])


class ConvGroup(nn.Module):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU: halves H and W."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv1 = Conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(channels_out)
        self.conv2 = Conv(channels_out, channels_out)
        self.norm2 = BatchNorm(channels_out)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))  # (B, C_out, H/2, W/2)
        return self.activ(self.norm2(self.conv2(x)))


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class Net(nn.Module):
    """airbench94's CNN. Input: float (B, 3, H, W) in [0, 1], H = W >= 16. Output: logits (B, K)."""

    def __init__(self, num_classes: int, width: float = 1.0):
        super().__init__()
        self.signature = architecture(num_classes, width)
        w1, w2, w3 = self.signature["widths"]
        whiten_width = 2 * 3 * WHITEN_KERNEL**2  # +/- each eigenvector of the 3x2x2 patch space
        self.register_buffer("mean", torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR_STD).view(1, 3, 1, 1), persistent=False)
        self.whiten = nn.Conv2d(3, whiten_width, kernel_size=WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set by init_whitening, never trained
        nn.init.zeros_(self.whiten.bias)
        self.block1 = ConvGroup(whiten_width, w1)
        self.block2 = ConvGroup(w1, w2)
        self.block3 = ConvGroup(w2, w3)
        self.head = nn.Linear(w3, num_classes, bias=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(self.normalise(x)))  # (B, 24, H-1, W-1)
        x = self.block3(self.block2(self.block1(x)))  # (B, w3, H/8, W/8), 3x3 at 32 px
        x = torch.amax(x, dim=(2, 3))  # (B, w3): global max-pool (airbench's MaxPool2d(3) at 32 px)
        return self.head(x) * LOGIT_SCALE  # (B, num_classes)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to whiten 2x2 patches of ``images`` (float (N, 3, H, W) in [0, 1]).

        Eigen-decomposition of the patch covariance: each filter projects onto one eigenvector,
        scaled by 1/sqrt(eigenvalue), in both signs so the GELU after it loses nothing. A few
        thousand images are plenty; use the same ones on every DDP rank.
        """
        x = self.normalise(images.float())
        k = WHITEN_KERNEL
        patches = x.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, 3 * k * k)  # (P, 12)
        cov = patches.T @ patches / len(patches)  # (12, 12)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)  # largest first
        filters = (eigenvectors / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, 3, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))


def build_model(num_classes: int, width: float = 1.0) -> Net:
    """The network with fresh weights (whitening still to be set with ``init_whitening``)."""
    return Net(num_classes, width)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# Saved models and inference
# --------------------------------------------------------------------------------------------


def model_bytes(model: Net, classes: list[str], extra: Optional[dict] = None) -> bytes:
    """Serialise weights, signature and class names: everything inference needs."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"architecture": model.signature, "classes": list(classes), "state_dict": state, **(extra or {})}, buf)
    return buf.getvalue()


def load_model(blob: bytes, expected: Optional[dict] = None, map_location: str | torch.device = "cpu") -> tuple[Net, list[str]]:
    """Rebuild a model written by :func:`model_bytes`; returns ``(model in eval mode, classes)``.

    With ``expected`` (an :func:`architecture` signature) a file for another network raises
    :class:`ArchitectureMismatchError` before any weight is touched.
    """
    obj: dict[str, Any] = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
    sig = obj.get("architecture")
    if expected is not None:
        check_architecture(expected, sig, "the model file")
    if sig is None or sig.get("name") != ARCHITECTURE_NAME:
        raise ArchitectureMismatchError(f"the model file holds architecture {sig!r}, not {ARCHITECTURE_NAME!r}")
    model = build_model(sig["num_classes"], sig["width"])
    model.load_state_dict(obj["state_dict"])
    return model.eval(), list(obj["classes"])


def tta_logits(model: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    """Logits averaged over test-time views (airbench): 0 none, 1 + mirror, 2 + 1-px shifts.

    ``x``: float (B, 3, H, W) in [0, 1]. Level 2 evaluates 6 views per image.
    """

    def mirror(inputs: torch.Tensor) -> torch.Tensor:
        return 0.5 * model(inputs) + 0.5 * model(inputs.flip(-1))

    if level == 0:
        return model(x)
    if level == 1:
        return mirror(x)
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # (B, 3, H+2, W+2)
    shifted = 0.5 * mirror(padded[:, :, 0:h, 0:w]) + 0.5 * mirror(padded[:, :, 2 : h + 2, 2 : w + 2])
    return 0.5 * mirror(x) + 0.5 * shifted
