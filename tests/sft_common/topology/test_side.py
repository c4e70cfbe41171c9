"""The side network's fixed projection, the middle's taps, and the network's start at zero."""

from __future__ import annotations

import torch

from sft_common.models.base_model import load_base_model
from sft_common.topology.side import SideNetwork, middle_taps, side_projection, side_width
from sft_common.topology.ushape import UShapeSpec, build_ushape_model


def test_the_projection_is_orthonormal_and_a_function_of_the_fingerprint_alone():
    p = side_projection("abc", 96, 64)
    assert p.shape == (96, 64) and p.dtype == torch.float32
    assert torch.allclose(p.T @ p, torch.eye(64), atol=1e-6)
    assert torch.equal(p, side_projection("abc", 96, 64))  # the cloud and the edge draw the same
    assert not torch.allclose(p, side_projection("abd", 96, 64))
    assert side_width(576) == 64 and side_width(32) == 32


def test_the_taps_are_each_middle_layers_output_projected_and_change_nothing():
    base = load_base_model("random:tiny-llama")
    head, middle, _ = build_ushape_model(base, UShapeSpec(0, 8, 1, "sl"), 2, seed=1)
    for part in (head, middle):
        part.eval()
    ids, mask = torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    projection = side_projection(base.fingerprint, 32, 16)
    with torch.no_grad():
        first, _ = head(ids, mask)
        plain, _ = middle(first, mask)
        out, taps = middle_taps(middle, first, mask, projection)
    assert torch.equal(out, plain) and len(middle.layers) == 2
    assert taps.shape == (2, 7, 2 * 16)
    assert torch.allclose(taps[..., 16:], plain @ projection, atol=1e-6)  # SL: the last layer's is h2
    assert not middle.layers[0]._forward_hooks  # the hooks are removed


def test_the_side_network_adds_nothing_until_it_trains():
    side = SideNetwork(32, 3, side_projection("abc", 32, 16), seed=7)
    x = torch.randn(2, 5, side.inputs)
    assert side.inputs == 4 * 16 and torch.equal(side(x), torch.zeros(2, 5, 32))
    assert "projection" not in side.state_dict()  # rebuilt from the base, never saved
    again = SideNetwork(32, 3, side_projection("abc", 32, 16), seed=7)
    assert all(torch.equal(a, b) for a, b in zip(side.state_dict().values(), again.state_dict().values()))
