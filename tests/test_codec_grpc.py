"""A decoder over full-width cuts with ``--wire-dtype int4-6-hadamard``, through a real gRPC server:
the same run as in one process (fp32, no wire) within the codec's rounding, U and two-part, LoRA.

The codec rounds activations to 4 bits (up) and 6 bits (down the U's second cut) in rotated groups and gradients to int8 with stochastic
rounding; each step's loss is compared with the one-process run's, whose wire is exact. The
tolerances are about 5x what was measured (CPU, torch 2.13), and each run checks that the codec
was used (its error is not 0, as fp32's is here).
"""

from __future__ import annotations

import pytest
from helpers import random_batch, train_in_one_process
from test_ushape_lm_grpc import OPTIM, lm_batches, train_lm_in_one_process

from sft_common.models.base_model import load_base_model
from sft_common.models.lora import LoraSpec
from sft_common.topology.spec import SplitSpec
from sft_common.topology.ushape import UShapeSpec
from sft_common.wire.codecs import Wire
from sft_edge.link.transport import GrpcTransport, open_channel
from sft_edge.runs.config import LinkOptions
from sft_edge.sessions.two_part import EdgeSession
from sft_edge.sessions.ushape import UShapeSession

LORA = LoraSpec(rank=4, alpha=8.0)
WIRE = LinkOptions(wire_dtype="int4-6-hadamard", compression="zstd")  # the decoder U's default
# Max |loss difference| over the steps, measured: see each test's print (pytest -s).
U_TOLERANCE = {"random:tiny-llama": 2.5e-2, "random:tiny-gpt2": 2e-2}  # measured 4.3e-3, 3.7e-3
TWO_PART_TOLERANCE = {"random:tiny-llama": 3e-2, "random:tiny-gpt2": 4e-2}  # measured 6.1e-3, 7.8e-3


@pytest.mark.parametrize("name", list(U_TOLERANCE))
@pytest.mark.parametrize("wire", ["int4-6-hadamard", "int4-6-hadamard-grad4"])
def test_causal_lm_u_over_the_codec_stays_close_to_one_process(live_server, name, wire):
    """The default wire, and the same with the gradients in 4-bit rotated groups (their rounding
    shows in the later steps' losses, after the updates they carried)."""
    address, _ = live_server
    base = load_base_model(name)
    spec = UShapeSpec(split_layer=0, tail_layers=1, mode="sl")
    transport = GrpcTransport(open_channel(address))
    gradients = []  # the dtype of every gradient that crossed, either way
    transport.listeners.append(lambda _, msg, __: gradients.extend(_gradient_dtypes(msg)))
    edge = UShapeSession(
        base, spec, 0, transport, OPTIM, batch_size=8, max_seq_len=32,
        link=LinkOptions(wire_dtype=wire, compression="zstd"), lora=LORA, causal_lm=True,
    )  # fmt: skip
    losses = [edge.train_step(k, b) for k, b in enumerate(lm_batches())]
    assert gradients and set(gradients) == {Wire.named(wire).gradients}
    *_, ref_losses = train_lm_in_one_process(base, spec, OPTIM, lm_batches(), LORA)
    error = max(abs(a - b) for a, b in zip(losses, ref_losses))
    print(f"U {name} {wire}: max |loss difference| {error:.2g} over {len(losses)} steps")
    assert 0 < error <= U_TOLERANCE[name]
    assert edge.close() == len(losses)


def _gradient_dtypes(msg):
    kind = msg.WhichOneof("kind")
    return (
        [msg.gradient_up.grad.dtype]
        if kind == "gradient_up"
        else [msg.gradient_down.grad.dtype]
        if kind == "gradient_down"
        else []
    )


@pytest.mark.parametrize("name", list(TWO_PART_TOLERANCE))
def test_two_part_classifier_over_the_codec_stays_close_to_one_process(live_server, name):
    address, _ = live_server
    base = load_base_model(name)
    spec = SplitSpec(split_layer=1, mode="sl")
    batches = [random_batch(batch=6, seq=14, seed=k) for k in range(5)]
    edge = EdgeSession(
        base, spec, 2, GrpcTransport(open_channel(address)), OPTIM, batch_size=8, max_seq_len=64,
        link=WIRE, lora=LORA,
    )  # fmt: skip
    losses = [edge.train_step(k, b) for k, b in enumerate(batches)]
    _, _, ref_losses = train_in_one_process(base, spec, OPTIM, batches, lora=LORA)
    error = max(abs(a - b) for a, b in zip(losses, ref_losses))
    print(f"two-part {name}: max |loss difference| {error:.2g} over {len(losses)} steps")
    assert 0 < error <= TWO_PART_TOLERANCE[name]
    assert edge.close() == len(losses)
