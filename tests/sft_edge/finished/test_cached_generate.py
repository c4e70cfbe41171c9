"""KV-cached generation gives the recomputing path's tokens: in one process, and through the daemon.

In one process: the U's three parts (an export) and Hugging Face's causal LM (a ``--local`` run),
greedy and sampled, tiny Llama and GPT-2. Through the daemon (a real ``SessionRegistry`` reached
in-process: every message serialized and parsed as on the wire): a finished U session reopened for
inference, the middle's cache on the cloud; after the prompt each token sends one row each way;
a cache the daemon freed (idle) is rebuilt from the rows sent; every bad ``DecodeStep`` is refused
with its status, changing nothing. A real gRPC daemon and the CLI: tests/test_generate_cached_grpc.py.
"""

from __future__ import annotations

import struct
import time

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sft_cloud.daemon.protocol import StreamProtocol
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.models.base_model import load_base_model, packaged_minilm_dir
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.ushape import UShapeSpec
from sft_common.topology.ushape_lm import build_causal_lm, build_ushape_lm_model
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError
from sft_edge.data.lm import IGNORE, LMEncoded, collate_lm
from sft_edge.finished.cached import DaemonMiddle, LocalMiddle, UShapeLM, WholeLM
from sft_edge.finished.generate import TextStream, decode_with, recompute
from sft_edge.link.transport import InProcessTransport
from sft_edge.runs.config import OptimConfig
from sft_edge.sessions.ushape import UShapeSession

MODELS = ["random:tiny-llama", "random:tiny-gpt2"]
PROMPT = [101, 1200, 1300, 1400, 1500]
SPEC = UShapeSpec(split_layer=0, rank=8, tail_layers=1)
OPTIM = OptimConfig(lr=1e-2, weight_decay=0.0, warmup_steps=0, total_steps=4, seed=5)


@pytest.fixture(scope="module")
def bases():
    """Each model loaded once (a random preset takes seconds to draw)."""
    return {name: load_base_model(name) for name in MODELS}


def _both(cached, recomputed, new=24, cap=64, temperature=0.0):
    args = (PROMPT, new, cap, temperature, 3)
    return decode_with(cached, *args), decode_with(recomputed, *args)


@pytest.mark.parametrize("name", MODELS)
def test_the_exported_u_generates_the_recomputed_tokens(bases, name):
    parts = tuple(p.eval() for p in build_ushape_lm_model(bases[name], SPEC, seed=3))
    head, middle, tail = parts

    def logits_of(batch):
        cut, _ = head(batch.input_ids, batch.attention_mask)
        return tail(middle(cut, batch.attention_mask)[0], batch.attention_mask)

    for temperature in (0.0, 1.0):
        lm = UShapeLM(head, LocalMiddle(middle, 64), tail, 64, "cpu")
        cached, recomputed = _both(lm.next_logits, recompute(logits_of), temperature=temperature)
        assert cached == recomputed and len(cached) == 24, temperature
        assert lm.middle.cache.length == len(PROMPT) + 23  # the last token is never fed
    assert len(set(recomputed)) > 1  # greedy on a random model need not repeat one token


@pytest.mark.parametrize("name", MODELS)
def test_the_local_causal_lm_generates_the_recomputed_tokens(bases, name):
    model = build_causal_lm(bases[name], seed=3).eval()

    def logits_of(batch):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    lm = WholeLM(model, 64, "cpu")
    cached, recomputed = _both(lm.next_logits, recompute(logits_of))
    assert cached == recomputed and len(cached) == 24
    with pytest.raises(ValueError, match="after 28 fed"):
        lm.next_logits(PROMPT)  # no token it has not seen
    with pytest.raises(ValueError, match="takes 1 .. 8"):
        WholeLM(model, 8, "cpu").next_logits(list(range(100, 109)))  # past the run's --max-seq-len


def test_the_text_streams_as_the_tokens_come():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_dir()))
    tokens = tokenizer("the river, at night, was dark blue", add_special_tokens=False)["input_ids"]
    pieces = []
    stream = TextStream(tokenizer, pieces.append)
    for k, token in enumerate(tokens):
        stream(token)
        assert len(pieces) == k + 1  # each token shows at once (none here is part of a character)
    stream.end()
    assert "".join(pieces) == tokenizer.decode(tokens, skip_special_tokens=True)


# -- through the daemon ------------------------------------------------------------------------


class Recording(InProcessTransport):
    """Serializes both ways as on the wire; keeps the decode messages that crossed."""

    log: list = []

    def _submit(self, msg):
        if msg.WhichOneof("kind") == "decode":
            Recording.log.append(msg.decode)
        super()._submit(msg)

    def close(self):
        self.protocol.detach()


@pytest.fixture(scope="module", params=MODELS)
def finished(request, tmp_path_factory, bases):
    """(registry, base, session id): a U causal-LM session trained 2 steps, closed, kept on disk."""
    base = bases[request.param]
    registry = SessionRegistry(device="cpu", checkpoint_dir=str(tmp_path_factory.mktemp("cloud")))
    registry._bases[base.name] = base
    session = _session(base, registry)
    rows = [[1000 + 37 * k + j for j in range(9)] for k in range(4)]
    for step in range(2):
        session.train_step(step, collate_lm(LMEncoded(rows, [[IGNORE] * 3 + r[3:] for r in rows]), range(4)))
    session.close()
    return registry, base, session.session_id


def _session(base, registry, **kw) -> UShapeSession:
    def connect():
        return Recording(StreamProtocol(registry, "tester"))

    return UShapeSession(base, SPEC, 0, connect, OPTIM, 4, 32, causal_lm=True, **kw)


def _reopened(finished):
    registry, base, session_id = finished
    session = _session(base, registry, session_id=session_id, inference_only=True)
    session.net.eval()
    return session


@pytest.fixture(scope="module")
def inference(finished):
    """The finished session reopened for inference once, for the tests that only send it steps."""
    session = _reopened(finished)
    yield session
    session.close()


def test_through_the_daemon_the_cached_tokens_are_the_recomputed_ones_one_row_a_token(finished):
    session = _reopened(finished)
    Recording.log = []
    lm = UShapeLM(session.head, DaemonMiddle(session), session.tail, 32, "cpu")
    cached, recomputed = _both(lm.next_logits, recompute(session.predict), new=20, cap=32)
    assert cached == recomputed and len(cached) == 20
    rows = [list(m.activations.shape) for m in Recording.log]
    assert rows == [[len(PROMPT), 8]] + [[1, 8]] * 19  # the prompt once, then one row a token
    assert [m.position for m in Recording.log] == [0] + list(range(len(PROMPT), len(PROMPT) + 19))
    protocol = session.transport.protocol
    assert protocol.decoding.cache.length == len(PROMPT) + 19
    session.close()
    assert protocol.decoding is None  # freed with the session


def test_a_cache_the_daemon_freed_is_rebuilt_and_the_tokens_do_not_change(finished):
    registry = finished[0]
    session = _reopened(finished)
    want = decode_with(recompute(session.predict), PROMPT, 12, 32)
    lm = UShapeLM(session.head, DaemonMiddle(session), session.tail, 32, "cpu")
    Recording.log = []
    freed = []

    def free_after_six(token):
        if len(freed) == 0 and len(Recording.log) == 6:  # the daemon sweeps while the stream idles
            freed.append(registry.caches.free_idle(time.monotonic() + registry.idle_timeout + 1, 0))

    assert decode_with(lm.next_logits, PROMPT, 12, 32, on_token=free_after_six) == want
    assert freed == [1]
    resent = [m for m in Recording.log if m.position == 0]
    assert [m.activations.shape[0] for m in resent] == [len(PROMPT), len(PROMPT) + 6]  # all rows, once
    session.close()


def _decode(position, rows, width=8):
    return pb.EdgeMessage(
        decode=pb.DecodeStep(
            position=position, activations=codec.encode(torch.randn(rows, width), pb.FLOAT32)
        )
    )


def test_bad_decode_steps_are_refused_and_change_nothing(finished):
    session = _reopened(finished)
    protocol = session.transport.protocol
    assert protocol.handle(_decode(0, 3)).decoded.cached == 3
    cases = [
        (_decode(-1, 1), grpc.StatusCode.INVALID_ARGUMENT, "position must be >= 0"),
        (_decode(3, 1, width=7), grpc.StatusCode.INVALID_ARGUMENT, "activations"),
        (_decode(3, 30), grpc.StatusCode.INVALID_ARGUMENT, "caches at most 32"),
        (_decode(31, 2), grpc.StatusCode.INVALID_ARGUMENT, "caches at most 32"),
        (
            pb.EdgeMessage(decode=pb.DecodeStep(position=3)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "without activations",
        ),
        (_decode(5, 1), grpc.StatusCode.FAILED_PRECONDITION, "holds 3 tokens"),
    ]
    for msg, code, words in cases:
        with pytest.raises(ProtocolError, match=words) as refused:
            protocol.handle(msg)
        assert refused.value.code == code
        assert protocol.decoding.cache.length == 3  # unchanged
    assert protocol.handle(_decode(3, 1)).decoded.cached == 4
    assert protocol.handle(_decode(0, 2)).decoded.cached == 2  # position 0: a new sequence
    session.close()


def test_only_a_finished_u_decodes(finished):
    registry, base, _ = finished
    training = _session(base, registry)
    with pytest.raises(ProtocolError, match="finished session reopened for inference") as refused:
        training.transport.protocol.handle(_decode(0, 1))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION


@settings(max_examples=60, deadline=None)
@given(
    position=st.one_of(st.integers(-(2**62), 2**62), st.integers(-2, 40)),
    shape=st.lists(st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**40, 2**62])), max_size=3),
    dtype=st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.INT8, 99]),
    data=st.one_of(st.binary(max_size=256), st.just(struct.pack("<f", float("nan")) * 8)),
)
def test_hostile_decode_steps_are_refused_with_a_status_and_change_nothing(
    inference, position, shape, dtype, data
):
    """Whatever a DecodeStep claims (terabyte shapes, any position, NaN, garbage), the cloud answers
    it or refuses it with INVALID_ARGUMENT or FAILED_PRECONDITION; a refusal leaves the cache as it was."""
    protocol = inference.transport.protocol
    protocol.handle(_decode(0, 3))
    msg = pb.EdgeMessage(
        decode=pb.DecodeStep(position=position, activations=pb.Tensor(dtype=dtype, shape=shape, data=data))
    )
    try:
        reply = protocol.handle(msg)
    except ProtocolError as exc:
        assert exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), exc
        assert protocol.decoding.cache.length == 3
    else:
        assert reply.decoded.cached == protocol.decoding.cache.length
