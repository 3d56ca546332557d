"""synth.model: shapes, width scaling, whitening, a step that learns, saved-model round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synth.model import (
    ArchitectureMismatchError,
    architecture,
    build_model,
    count_parameters,
    load_model,
    model_bytes,
    tta_logits,
)
from synth.recipe import logits


@pytest.mark.parametrize("width,size,batch", [(0.125, 32, 4), (0.25, 32, 1), (0.125, 16, 3), (0.125, 64, 2)])
def test_forward_shapes(width, size, batch):
    model = build_model(num_classes=6, width=width).eval()
    x = torch.rand(batch, 3, size, size)  # (B, 3, H, W) in [0, 1]
    assert model(x).shape == (batch, 6)
    for level in (0, 1, 2):
        assert tta_logits(model, x, level).shape == (batch, 6)


def test_signature_names_the_widths():
    sig = architecture(10, 0.5)
    assert sig["widths"] == [32, 128, 128] and sig["num_classes"] == 10
    assert build_model(10, 0.5).signature == sig


def test_parameter_count_scales_with_width():
    counts = {w: count_parameters(build_model(10, w)) for w in (0.25, 0.5, 1.0)}
    assert counts[1.0] == 1_972_792  # the figure quoted in synth.model's docstring
    # Conv weights dominate and grow with width squared: doubling the width ~quadruples them.
    assert 3.5 < counts[1.0] / counts[0.5] < 4.1 and 3.5 < counts[0.5] / counts[0.25] < 4.1
    model = build_model(10, 1.0)
    assert count_parameters(model) - count_parameters(model, trainable_only=True) == 288 + 1152


def test_whitening_makes_stem_outputs_unit_variance():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 32, 32) * torch.tensor([0.5, 1.0, 0.2]).view(1, 3, 1, 1)  # correlated, uneven
    model = build_model(6, 0.125)
    model.init_whitening(images)
    with torch.no_grad():
        out = model.whiten(model.normalise(images)) - model.whiten.bias.view(1, -1, 1, 1)  # (B, 24, 31, 31)
    second_moment = out.transpose(0, 1).reshape(24, -1).pow(2).mean(dim=1)
    # Each filter projects onto one eigenvector of the (uncentred, as in airbench) patch second
    # moment, scaled by 1/sqrt(eigenvalue + eps): unit second moment, a little less where the
    # eigenvalue is tiny and eps dominates.
    assert torch.all(second_moment <= 1.01) and torch.all(second_moment[:6] > 0.95)
    assert not model.whiten.weight.requires_grad


def test_one_training_step_reduces_loss():
    torch.manual_seed(0)
    model = build_model(6, 0.25).train()
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 6, (32,))
    model.init_whitening(x)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9, nesterov=True)
    before = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    assert after.item() < before.item()


def test_saved_model_round_trip_and_mismatch():
    torch.manual_seed(0)
    model = build_model(3, 0.125).eval()
    model.init_whitening(torch.rand(8, 3, 32, 32))
    blob = model_bytes(model, ["a", "b", "c"], {"seed": 7})
    loaded, classes = load_model(blob, expected=architecture(3, 0.125))
    assert classes == ["a", "b", "c"]
    images = (torch.rand(5, 32, 32, 3) * 255).to(torch.uint8).numpy()  # (N, H, W, 3) uint8
    cpu = torch.device("cpu")  # batch sizes 2 and 4: batching must not change a logit
    assert torch.allclose(logits(model, images, 2, 2, cpu, "float32"), logits(loaded, images, 4, 2, cpu, "float32"), atol=1e-5)
    with pytest.raises(ArchitectureMismatchError, match=r"width: 0\.125 there, 0\.25 here"):
        load_model(blob, expected=architecture(3, 0.25))
    with pytest.raises(ArchitectureMismatchError, match="num_classes"):
        load_model(blob, expected=architecture(4, 0.125))
