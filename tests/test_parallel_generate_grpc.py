"""KV-cached generation through a real daemon for a `--forward-only --adapters parallel` run.

The daemon's cached decoding of a session with a side width answers each ``DecodeStep`` with the
new rows' taps (``DecodeReply.side``: the middle's layers' outputs projected by P), and the edge's
side network reads them, so such a run generates through the daemon with the KV cache. At fp32 on
the wire (each row crosses as it is) its greedy tokens are those of ``--no-kv-cache`` through the
daemon and of the run's export (no daemon), its next-token logits within 1e-5 of recomputing's; and
after the prompt each token costs one row up and one row (and its taps) down instead of the whole
sequence; a cache the daemon dropped is rebuilt (the rows sent again from 0). An answer without
taps (an older daemon) or with taps of another shape is refused, the shape checked before anything
is allocated.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from helpers import AllocationSpy, write_completion_rows

from sft_cloud.sessions.inference import CachedMiddle
from sft_common.models.base_model import load_base_model
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.side import side_width
from sft_edge import cli
from sft_edge.data.activation_cache import ActivationCache
from sft_edge.finished.cached import open_cached
from sft_edge.finished.generate import generate, prompt_ids, recompute
from sft_edge.finished.parts import open_model
from sft_edge.finished.predict import export
from sft_edge.finished.record import read_run
from sft_edge.link.transport import CloudError
from sft_edge.runs.config import Connection, ExportConfig, GenerateConfig, LinkOptions
from sft_edge.sessions.forward_only import ForwardOnlySession
from tests.test_forward_only_grpc import OPTIM, SPEC

PROMPT = "red green blue"
NEW = 16
NO_DAEMON = Connection(cloud="127.0.0.1:1", insecure=True)  # nothing listens there


def train_parallel(tmp_path, address, steps=8):
    """A tiny-Llama parallel run of ``steps`` steps through the daemon at ``address``, fp32 wire."""
    run = str(tmp_path / "run")
    argv = [
        "train", "--problem", "causal-lm", "--model", "random:tiny-llama",
        "--train-file", write_completion_rows(tmp_path / "train.jsonl", 16),
        "--dev-file", write_completion_rows(tmp_path / "dev.jsonl", 4, 50),
        "--max-steps", str(steps), "--lr", "1e-2", "--batch-size", "4", "--forward-only",
        "--adapters", "parallel", "--wire-dtype", "fp32", "--no-progress", "--cloud", address,
        "--insecure", "--output-dir", run,
    ]  # fmt: skip
    assert cli.main(argv) == 0
    return run


def of_kind(messages, kind):
    return [(m, r) for m, r in messages if m.WhichOneof("kind") == kind]


def bytes_of(pairs):
    """Bytes both ways of each (EdgeMessage, CloudMessage) pair, as they cross."""
    return [m.ByteSize() + r.ByteSize() for m, r in pairs]


def test_parallel_run_generates_through_the_daemon_with_its_kv_cache(tmp_path, recorded, monkeypatch):
    """The KV-cached tokens = --no-kv-cache's through the daemon = the export's; each decode's
    answer carries its rows' taps; a new token costs far fewer bytes than recomputing; the logits
    within 1e-5; a dropped cache rebuilt with the same tokens; an older daemon's answer (no taps)
    is refused with what to do."""
    address, registry, messages = recorded
    run = train_parallel(tmp_path, address)
    conn = Connection(cloud=address, insecure=True)
    del messages[:]
    cached = generate(GenerateConfig(run, PROMPT, NEW, connection=conn))
    decodes = of_kind(messages, "decode")
    del messages[:]
    recomputed = generate(GenerateConfig(run, PROMPT, NEW, connection=conn, kv_cache=False))
    evals = of_kind(messages, "eval")
    to = str(tmp_path / "export")
    export(ExportConfig(run, to, NO_DAEMON))
    alone = generate(GenerateConfig(to, PROMPT, NEW, connection=NO_DAEMON))
    assert cached["tokens"] == recomputed["tokens"] == alone["tokens"] and len(cached["tokens"]) == NEW

    prompt = cached["prompt_tokens"]
    assert [list(m.decode.activations.shape) for m, _ in decodes] == [[prompt, 32]] + [[1, 32]] * (NEW - 1)
    taps = evals[0][1].eval.side.shape[1]  # the middle's layers times the side width, as in training
    assert taps > side_width(32) and taps % side_width(32) == 0
    for msg, reply in decodes:
        assert list(reply.decoded.side.shape) == [msg.decode.activations.shape[0], taps]
    per_token = bytes_of(decodes)[1:]  # after the prompt: one row up, one row and its taps down
    recomputing = bytes_of(evals)  # the whole sequence each token, up and down
    assert len(set(per_token)) == 1 and len(recomputing) == NEW, (per_token, recomputing)
    assert all(a < b for a, b in zip(recomputing, recomputing[1:]))  # a row more each token
    # measured: 560 B a token cached, against 1,581 .. 9,261 B (mean 5,421) recomputing
    assert per_token[0] * 5 < sum(recomputing) / NEW and per_token[0] * 15 < recomputing[-1]

    ids = prompt_ids(read_tokenizer(run), PROMPT, chat=False) + cached["tokens"][:3]
    through = open_model(run, read_run(run), "cpu", conn)
    lm = open_cached(run, read_run(run), "cpu", conn)
    try:
        want = recompute(through.logits)(ids)
        lm.next_logits(ids[:-2]), lm.next_logits(ids[:-1])
        assert float((lm.next_logits(ids) - want).abs().max()) <= 1e-5
    finally:
        through.close(), lm.close()

    pieces: list = []

    def drop_once(text):  # the daemon frees the cache after the third token (as when it idles)
        pieces.append(text)
        if len(pieces) == 3:
            assert registry.caches.free_idle(time.monotonic() + 1e6, 0.0) == 1

    del messages[:]
    again = generate(GenerateConfig(run, PROMPT, NEW, connection=conn), on_text=drop_once)
    assert again["tokens"] == cached["tokens"]  # every row sent again from 0 once, taps and all
    assert sum(r.decoded.cached == 0 for _, r in of_kind(messages, "decode")) == 1

    decode = CachedMiddle.decode

    def older(self, msg):  # a daemon from before DecodeReply.side
        reply = decode(self, msg)
        reply.ClearField("side")
        return reply

    monkeypatch.setattr(CachedMiddle, "decode", older)
    with pytest.raises(CloudError, match="predates KV-cached generation for such runs"):
        generate(GenerateConfig(run, PROMPT, NEW, connection=conn))
    assert len(registry) == 0  # every session closed


def read_tokenizer(run):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run)


def never():
    raise AssertionError("no connection: the answers are handed to the session")


def parallel_edge():
    """A parallel run's edge session (tiny Llama, fp32 wire) that never opens a cloud session."""
    base = load_base_model("random:tiny-llama")
    cache = ActivationCache(None, {"base": base.fingerprint, "side_width": side_width(32)}, 1.0)
    link = LinkOptions(wire_dtype="fp32")
    return ForwardOnlySession(
        base, SPEC, 0, never, OPTIM, 8, 32, link, cache, causal_lm=True, adapters="parallel"
    )


def test_a_decode_answer_without_taps_or_of_another_shape_is_refused():
    """No ``side``: FAILED_PRECONDITION naming an older daemon and --no-kv-cache; taps of another
    width, or a hostile claimed shape: refused before anything of that size is allocated; the right
    answer gives h2 + the side network's output."""
    edge = parallel_edge()
    edge.net["side"].up.weight.data.normal_()  # as if trained: the side network adds something
    layers = edge.placement.layers
    first, rows = torch.randn(3, 32), torch.randn(3, 32)
    taps = torch.randn(3, layers * 32)
    reply = pb.DecodeReply(position=0, activations=edge.wire.encode_activations(rows), cached=3)
    with pytest.raises(CloudError, match="without the middle's layers' taps.*--no-kv-cache") as info:
        edge.decoded(first, reply)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert not str(info.value).startswith("cloud said")  # the edge concluded it

    for shape in ([3, layers * 32 + 1], [2, layers * 32], [1 << 40, 1 << 40]):
        bad = pb.DecodeReply()
        bad.CopyFrom(reply)
        bad.side.CopyFrom(edge.wire.encode_activations(taps))
        bad.side.ClearField("shape")
        bad.side.shape.extend(shape)
        with AllocationSpy() as spy, pytest.raises(CloudError, match="refused the middle's output"):
            edge.decoded(first, bad)
        spy.assert_bounded(taps.numel() * 4)

    reply.side.CopyFrom(edge.wire.encode_activations(taps))
    side = edge.net["side"]
    with torch.no_grad():
        want = rows + side(torch.cat([first @ side.projection, taps], dim=-1))
    assert torch.allclose(edge.decoded(first, reply), want, atol=1e-6)
    assert float((want - rows).abs().max()) > 1e-3
