"""Session leases among replicas sharing a checkpoint dir: epochs increase, one holder at a time,
expiry, and a stale holder fenced before it applies a step or writes anything."""

from __future__ import annotations

import json
import os
import threading

import grpc
import pytest
import torch
from helpers import max_diff, params
from helpers import open_stream as _open
from helpers import train_message as _step

from sft_cloud.daemon import lease as lease_mod
from sft_cloud.daemon.config import ServeConfig
from sft_cloud.daemon.lease import FencedCheckpointDir, Lease, SessionMoved, lease_folder, read_record
from sft_cloud.daemon.protocol import StreamProtocol
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.proto import sft_pb2 as pb
from sft_common.wire.errors import ProtocolError


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_epochs_increase_and_only_the_newest_holder_holds(tmp_path):
    a, b = Lease(str(tmp_path), "a"), Lease(str(tmp_path), "b")
    assert a.acquire() is None and a.epoch == 1 and a.held()
    previous = b.acquire()
    assert previous is not None and (previous.epoch, previous.replica) == (1, "a")
    assert b.epoch == 2 and b.held() and not a.held()
    assert not a.renew()  # a fenced holder writes nothing, not even its lease
    assert read_record(str(tmp_path)).replica == "b"  # type: ignore[union-attr]
    with pytest.raises(SessionMoved, match=r"session moved to another replica \(b, epoch 2\)") as info:
        a.check()
    assert (
        info.value.code == grpc.StatusCode.ABORTED
    )  # the edge retries it (sft_edge.link.transport.RETRYABLE)
    assert a.acquire().replica == "b" and a.epoch == 3 and a.held() and not b.held()  # type: ignore[union-attr]
    assert sorted(os.listdir(tmp_path)) == [
        "epoch-000000001",
        "epoch-000000002",
        "epoch-000000003",
        "lease.json",
    ]


def test_concurrent_takeovers_get_distinct_epochs_and_one_holder(tmp_path):
    leases = [Lease(str(tmp_path), f"r{i}") for i in range(8)]
    start = threading.Barrier(len(leases))

    def take(lease):
        start.wait()
        lease.acquire()

    threads = [threading.Thread(target=take, args=(x,)) for x in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(x.epoch for x in leases) == list(range(1, 9))
    assert [x.epoch for x in leases if x.held()] == [8]


def test_a_stale_lease_file_written_after_a_takeover_does_not_unfence(tmp_path):
    """The holder renews (its check passed) just as another replica claims the next epoch: its
    lease.json lands after the new one. The claim file still fences it; the new holder holds."""
    a, b = Lease(str(tmp_path), "a"), Lease(str(tmp_path), "b")
    a.acquire()
    b.acquire()
    a._write(1e12)  # what a's renewal would write had it checked just before b's claim
    assert read_record(str(tmp_path)).epoch == 1  # type: ignore[union-attr]
    assert not a.held() and b.held() and b.renew()
    assert read_record(str(tmp_path)).epoch == 2  # type: ignore[union-attr]


def test_expiry_renewal_release_and_removal(tmp_path):
    clock = Clock()
    a = Lease(str(tmp_path), "a", seconds=30, clock=clock)
    a.acquire()
    record = read_record(str(tmp_path))
    assert (
        record is not None and record.expires == 1030 and not record.expired(1029.9) and record.expired(1030)
    )
    clock.now = 1020
    assert a.renew() and read_record(str(tmp_path)).expires == 1050  # type: ignore[union-attr]
    clock.now = 1060  # a dead holder stops renewing: the next one sees its lease expired
    previous = Lease(str(tmp_path), "b", clock=clock).acquire()
    assert previous is not None and previous.replica == "a" and previous.expired(clock.now)
    assert not a.held()
    c = Lease(str(tmp_path / "other"), "c", seconds=30, clock=clock)
    c.acquire()
    c.release()  # a session evicted or shut down in good order: expired at once
    assert read_record(c.folder).expired(clock.now)  # type: ignore[union-attr]
    assert c.held()  # released is not taken: the holder still holds until someone claims
    c.remove()  # closed: the folder goes, and a stale holder finds no lease at all
    assert not os.path.exists(c.folder) and not c.held()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # written by rename, nothing left


def test_a_checkpoint_is_not_renamed_into_place_once_fenced(tmp_path, monkeypatch):
    """The narrowest window: the takeover happens while the holder writes the temporary file."""
    folder, leases = str(tmp_path / "session"), str(tmp_path / "lease")
    a = Lease(leases, "a")
    a.acquire()
    ckpts = FencedCheckpointDir(folder, a)
    real_save = lease_mod.checkpoint.save

    def save_then_taken(path, tensors, meta):
        real_save(path, tensors, meta)
        Lease(leases, "b").acquire()

    monkeypatch.setattr(lease_mod.checkpoint, "save", save_then_taken)
    with pytest.raises(SessionMoved):
        ckpts.save(4, {"w": torch.zeros(2)}, {"step": 4})
    assert os.listdir(folder) == [] and ckpts.steps() == []


def _reattach(registry, owner_msg: pb.OpenSession, session_id: str, steps) -> StreamProtocol:
    attach = pb.OpenSession()
    attach.CopyFrom(owner_msg)
    attach.session_id = session_id
    attach.resume_steps[:] = steps
    proto = StreamProtocol(registry, "edge-a")
    proto.handle(pb.EdgeMessage(open=attach))
    return proto


def _files(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def test_a_stale_owner_is_fenced_before_it_applies_a_step_or_writes(tmp_path, tiny_base):
    ckpt = str(tmp_path)
    a_reg = SessionRegistry(checkpoint_dir=ckpt, replica_id="a", idle_timeout=0.01)
    b_reg = SessionRegistry(checkpoint_dir=ckpt, replica_id="b")
    a = _open(a_reg, tiny_base)
    sid, folder = a.session.session_id, os.path.join(ckpt, a.session.session_id)
    steps = [_step(k) for k in range(4)]
    a.handle(steps[0])
    a.handle(steps[1])
    a.handle(pb.EdgeMessage(checkpoint=pb.Checkpoint(step=2)))
    a_reply2 = a.handle(steps[2]).train
    assert json.load(open(os.path.join(lease_folder(ckpt, sid), "lease.json")))["replica"] == "a"

    # The proxy sends the device to b while a lives: b takes the session at epoch 2 from step 2.
    open_msg = pb.OpenSession(config=a.session.config, fingerprint=a.session.fingerprint)
    b = _reattach(b_reg, open_msg, sid, [3, 2])
    assert b.session.next_step == 2 and read_record(lease_folder(ckpt, sid)).replica == "b"  # type: ignore[union-attr]

    # a learns it before it applies anything: a new step, a retry answered from its cache, a
    # checkpoint, the final weights. Its state stays as it was and nothing is written.
    stale, before = a.session, params(a.session.net2)
    for msg in (steps[3], steps[2], pb.EdgeMessage(checkpoint=pb.Checkpoint(step=3))):
        with pytest.raises(ProtocolError, match="session moved to another replica") as info:
            a.handle(msg)
        assert info.value.code == grpc.StatusCode.ABORTED
    with pytest.raises(SessionMoved):
        stale.core.save_final()
    assert stale.next_step == 3 and max_diff(before, params(stale.net2)) == 0
    assert _files(folder) == ["step-000000002.safetensors"]
    a.detach()
    assert a_reg.renew_leases() == [sid] and len(a_reg) == 0  # dropped here, unwritten
    assert a_reg.evict_idle() == [] and _files(folder) == ["step-000000002.safetensors"]

    # b serves from the checkpoint: step 2 again gives a's answer, so no step counts twice.
    assert b.handle(steps[2]).train == a_reply2
    b.handle(pb.EdgeMessage(checkpoint=pb.Checkpoint(step=3)))
    # The device comes back to a: a takes it back from b's newest checkpoint, and b is fenced.
    back = _reattach(a_reg, open_msg, sid, [3])
    assert back.session.next_step == 3 and back.session is not stale
    with pytest.raises(ProtocolError, match="session moved"):
        b.handle(steps[3])
    back.handle(steps[3])
    assert back.handle(pb.EdgeMessage(close=pb.CloseSession())).closed.steps == 4
    assert _files(folder) == ["final.safetensors"] and not os.path.exists(lease_folder(ckpt, sid))
    assert b_reg.renew_leases() == [sid] and len(b_reg) == 0


def test_an_in_memory_session_taken_elsewhere_is_rebuilt_at_the_next_attach(tmp_path, tiny_base):
    """a still holds the session (its renewal has not run yet) when the device comes back."""
    ckpt = str(tmp_path)
    a_reg, b_reg = (SessionRegistry(checkpoint_dir=ckpt, replica_id=r) for r in "ab")
    a = _open(a_reg, tiny_base)
    sid = a.session.session_id
    a.handle(_step(0))
    a.handle(pb.EdgeMessage(checkpoint=pb.Checkpoint(step=1)))
    a.handle(_step(1))
    a.detach()
    open_msg = pb.OpenSession(config=a.session.config, fingerprint=a.session.fingerprint)
    _reattach(b_reg, open_msg, sid, [2, 1]).detach()
    again = _reattach(a_reg, open_msg, sid, [2, 1])  # a's copy at step 2 is stale: step 1, from disk
    assert again.session is not a.session and again.session.next_step == 1
    assert a_reg.renew_leases() == [] and b_reg.renew_leases() == [sid]


def test_lease_flags_are_checked():
    with pytest.raises(ValueError, match="--lease-seconds must be in 1..3600"):
        ServeConfig(insecure=True, lease_seconds=0).validate()
    with pytest.raises(ValueError, match="--replica-id"):
        ServeConfig(insecure=True, replica_id="a/b").validate()
    ServeConfig(insecure=True, replica_id="sft-cloud-7d9f-0", lease_seconds=30).validate()
