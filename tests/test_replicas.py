"""Two real daemons behind real nginx (deploy/nginx/nginx.conf), sharing one checkpoint dir: the
owner killed mid-run, a split brain refused, runs spread by the routing key, a restarted
replica rejoining. Runs end bitwise equal to an uninterrupted run.

The edge trains in this process (``sft_edge.runs.trainer.train``); daemons and nginx are real
processes on 127.0.0.1. Skipped where nginx is not installed (``apt-get install nginx-light``).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch
from safetensors.torch import load_file

from sft_cloud.daemon.lease import lease_folder, read_record
from sft_common.proto import sft_pb2 as pb
from sft_common.storage.checkpoint import CheckpointDir
from sft_edge.link.transport import GrpcTransport, open_channel
from sft_edge.runs.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx-light; .ci/run does)"
)
STEPS, EVERY = 40, 10
LEASE_S = 3  # renewed every second: a replica drops a session taken elsewhere within about 1 s
FAIL_TIMEOUT_S = 2  # nginx retries a failed replica after this (deploy/nginx/nginx.conf: 10 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def nginx_conf(tmp: Path, listen: int, ports: List[int]) -> str:
    """deploy/nginx/nginx.conf with these upstream ports, plaintext h2c on ``listen`` and every
    path in ``tmp``: all else (hash, failover, timeouts) as shipped."""
    text = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    servers = "".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout={FAIL_TIMEOUT_S}s;\n" for p in ports
    )
    paths = "".join(
        f"    {kind}_temp_path {tmp}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    edits = [  # (what the shipped file says, what it becomes here)
        (r"(?m)^ +server cloud-\w+:\d+ .*\n", ""),
        (r"(?m)^ +hash \$http_x_sft_route consistent;\n", "\\g<0>" + servers),
        (r"listen 8443 ssl http2;", f"listen 127.0.0.1:{listen} http2;"),  # plaintext h2c
        (r"(?m)^ +ssl_.*\n", ""),
        (r"pid /tmp/nginx\.pid;", f"pid {tmp}/nginx.pid;"),
        (r"error_log /dev/stderr warn;", f"error_log {tmp}/error.log info;"),
        (r"access_log /dev/stdout sft;", f"access_log {tmp}/access.log sft;\n" + paths),
    ]
    for pattern, repl in edits:
        text, n = re.subn(pattern, repl, text)
        assert n, f"deploy/nginx/nginx.conf no longer has {pattern!r}"
    return text


class Nginx:
    """Real nginx, in the foreground, on a free port of 127.0.0.1."""

    def __init__(self, tmp: Path, ports: List[int]):
        self.tmp, self.port = tmp, _free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_conf(tmp, self.port, ports))
        cmd = [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log"), "-g", "daemon off;"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait(self._up, 30, f"nginx on port {self.port} ({self._errors()})")

    def _up(self) -> bool:
        assert self.proc.poll() is None, f"nginx exited: {self._errors()}"
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def _errors(self) -> str:
        path = self.tmp / "error.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def upstreams(self, route: str) -> List[int]:
        """The replica ports that served the streams of ``route``, in order (for a stream that
        failed over, the replica it ended on)."""
        found = re.findall(rf"route={route} upstream=(.*?) status=", (self.tmp / "access.log").read_text())
        return [int(tried.split(", ")[-1].rsplit(":", 1)[1]) for tried in found]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Replica:
    """`sft-cloud serve` as its own process, its log in a file (readable after a kill -9)."""

    def __init__(self, name: str, ckpt: str, tmp: Path):
        self.name, self.ckpt, self.port = name, ckpt, 0
        self.log = tmp / f"replica-{name}.log"
        self.offset = 0  # where the log of the current life begins

    def start(self) -> None:
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        cmd = [
            sys.executable, "-m", "sft_cloud.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--insecure", "--device", "cpu", "--checkpoint-dir", self.ckpt, "--replica-id", self.name,
            "--lease-seconds", str(LEASE_S), "--grace-seconds", "2",
        ]  # fmt: skip
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait(self, timeout: float = 180) -> None:
        def listening():
            assert self.proc.poll() is None, f"replica {self.name} exited:\n{self.text()[-3000:]}"
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.text(since_start=True))
            return match and int(match.group(1))

        self.port = _wait(listening, timeout, f"replica {self.name} listening")

    def text(self, since_start: bool = False) -> str:
        data = self.log.read_text() if self.log.exists() else ""
        return data[self.offset :] if since_start else data

    def opened(self, since_start: bool = False) -> List[str]:
        """Session ids (first 8 characters) this replica opened: its INFO line per session."""
        return re.findall(r"session (\S{8}): opened", self.text(since_start))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class Cluster:
    """Replicas a and b (one shared checkpoint dir) behind nginx; ``address`` is nginx's."""

    def __init__(self, tmp: Path):
        self.ckpt = str(tmp / "checkpoints")
        self.replicas = {name: Replica(name, self.ckpt, tmp) for name in "ab"}
        for r in self.replicas.values():
            r.start()
        try:
            for r in self.replicas.values():
                r.wait()
            self.nginx = Nginx(tmp / "nginx", [r.port for r in self.replicas.values()])
        except BaseException:
            self.stop()
            raise
        self.address = f"127.0.0.1:{self.nginx.port}"

    def revive(self) -> None:
        """Restart (on its port) a replica an earlier test killed, and let nginx try it again."""
        dead = [r for r in self.replicas.values() if r.proc.poll() is not None]
        for r in dead:
            r.start()
        for r in dead:
            r.wait()
        if dead:
            time.sleep(FAIL_TIMEOUT_S + 0.5)

    def stop(self) -> None:
        if hasattr(self, "nginx"):
            self.nginx.stop()
        for r in self.replicas.values():
            r.stop()


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    up = Cluster(tmp_path_factory.mktemp("cluster"))
    yield up
    up.stop()


@pytest.fixture
def cluster(shared_cluster, tiny_base):
    """The cluster with both replicas up and their base model loaded."""
    shared_cluster.revive()
    for r in shared_cluster.replicas.values():
        _warm(r.port, tiny_base)
    return shared_cluster


def _warm(port: int, base) -> None:
    """Open and close a session directly on a replica: it has loaded random:tiny afterwards."""
    from helpers import session_config

    from sft_common.topology.spec import SplitSpec, session_fingerprint

    fingerprint = session_fingerprint(base.fingerprint, SplitSpec(split_layer=3, rank=8), 2)
    stream = GrpcTransport(open_channel(f"127.0.0.1:{port}"), owns_channel=True)
    try:
        stream.call(pb.EdgeMessage(open=pb.OpenSession(config=session_config(), fingerprint=fingerprint)))
        stream.call(pb.EdgeMessage(close=pb.CloseSession()))
    finally:
        stream.close()


def _config(glue_dir: str, cloud: str, out: Path, **kw) -> TrainConfig:
    values = dict(
        task="sst2", cloud=cloud, model="random:tiny", data_dir=glue_dir, batch_size=8, max_steps=STEPS,
        checkpoint_every=EVERY, max_train_examples=160, max_eval_examples=48, lr=1e-3, insecure=True,
        progress=False, output_dir=str(out), reconnect_timeout=90.0,
    )  # fmt: skip
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def reference(glue_dir, shared_cluster, tmp_path_factory):
    """The uninterrupted run, through nginx: (report, run dir, the cloud's final weights)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    report = train(_config(glue_dir, shared_cluster.address, run_dir))
    assert report["resumes"] == 0 and report["steps"] == STEPS
    return report, run_dir, Path(shared_cluster.ckpt) / report["session_id"] / "final.safetensors"


class Background:
    """``train(cfg)`` in a thread; ``join`` returns its report or raises what it raised."""

    def __init__(self, cfg: TrainConfig):
        self.result: Dict = {}
        self.thread = threading.Thread(target=self._run, args=(cfg,), daemon=True)
        self.thread.start()

    def _run(self, cfg: TrainConfig) -> None:
        try:
            self.result["report"] = train(cfg)
        except BaseException as exc:  # re-raised in join
            self.result["error"] = exc

    def join(self, timeout: float = 240) -> Dict:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the run did not finish within {timeout:.0f}s"
        if "error" in self.result:
            raise self.result["error"]
        return self.result["report"]


def _first_checkpoint(ckpt: str, others: Set[str]) -> str:
    """The id of the session (the run's; not one of ``others``) once its first agreed checkpoint
    is on disk."""

    def found():
        paths = glob.glob(os.path.join(ckpt, "*", f"step-{EVERY:09d}.safetensors"))
        return [p.split(os.sep)[-2] for p in paths if p.split(os.sep)[-2] not in others]

    return _wait(found, 120, "the run's first checkpoint")[0]


def _assert_equal_to_reference(reference, report: Dict, run_dir: Path, ckpt: str) -> None:
    ref, ref_dir, ref_final = reference
    assert report["steps"] == ref["steps"] == STEPS and report["cloud_steps"] == STEPS
    assert report["metrics"] == ref["metrics"] and report["eval_history"] == ref["eval_history"]
    for a, b in ((ref_dir / "edge.safetensors", run_dir / "edge.safetensors"),
                 (ref_final, Path(ckpt) / report["session_id"] / "final.safetensors")):  # fmt: skip
        x, y = load_file(a), load_file(b)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{b} differs from {a}"


def test_the_owner_killed_mid_run_another_replica_finishes_it_bitwise(cluster, reference, glue_dir, tmp_path):
    run_dir = tmp_path / "run"
    before = set(os.listdir(cluster.ckpt))
    run = Background(_config(glue_dir, cluster.address, run_dir))
    sid = _first_checkpoint(cluster.ckpt, before)
    owner = read_record(lease_folder(cluster.ckpt, sid)).replica  # type: ignore[union-attr]
    other = next(r for name, r in cluster.replicas.items() if name != owner)
    cluster.replicas[owner].kill()  # kill -9, mid-run: it checkpoints nothing more
    report = run.join()

    assert report["resumes"] >= 1 and report["session_id"] == sid
    _assert_equal_to_reference(reference, report, run_dir, cluster.ckpt)
    taken = re.search(rf"session {re.escape(sid[:8])}: restored from checkpoint at step (\d+); taken at epoch 2 "
                      rf"\(from {owner}, epoch 1,", other.text())  # fmt: skip
    assert taken and int(taken.group(1)) % EVERY == 0, other.text()[-3000:]
    served = cluster.nginx.upstreams((run_dir / "route-key").read_text().strip())
    assert [served[0], served[-1]] == [cluster.replicas[owner].port, other.port]


def test_a_split_brain_is_refused(cluster, reference, glue_dir, tmp_path):
    """While the owner trains the run, the device's session is attached at the other replica
    (as if the proxy had moved it): that one takes it from the last checkpoint, the owner drops
    it before its next step, the edge re-attaches through nginx, and the run ends as if nothing
    happened."""
    run_dir = tmp_path / "run"
    before = set(os.listdir(cluster.ckpt))
    run = Background(_config(glue_dir, cluster.address, run_dir))
    sid = _first_checkpoint(cluster.ckpt, before)
    owner_name = read_record(lease_folder(cluster.ckpt, sid)).replica  # type: ignore[union-attr]
    owner = cluster.replicas[owner_name]
    other = next(r for name, r in cluster.replicas.items() if name != owner_name)
    meta = CheckpointDir(os.path.join(cluster.ckpt, sid)).meta(EVERY)
    attach = pb.OpenSession(
        session_id=sid, config=pb.SessionConfig.FromString(bytes.fromhex(meta["config"])),
        fingerprint=meta["fingerprint"], resume_steps=[EVERY],
    )  # fmt: skip
    stream = GrpcTransport(open_channel(f"127.0.0.1:{other.port}"), owns_channel=True)
    stream.submit(pb.EdgeMessage(open=attach))
    opened = stream.result().opened
    stream.close()
    assert opened.next_step == EVERY  # from the checkpoint, not from the owner's live state
    report = run.join()

    _assert_equal_to_reference(reference, report, run_dir, cluster.ckpt)
    assert report["resumes"] >= 1
    sid8 = re.escape(sid[:8])
    # The owner refused the first message after the takeover, before applying it ...
    assert re.search(rf"session {sid8}: refused \w+: ABORTED: session moved to another replica "
                     rf"\({other.name}, epoch 2\)", owner.text()), owner.text()[-3000:]  # fmt: skip
    # ... took the session back when the edge re-attached through nginx (its key still hashes
    # there), from the newest checkpoint; and the other replica dropped it without writing.
    assert re.search(rf"session {sid8}: restored from checkpoint at step \d+; taken at epoch 3 "
                     rf"\(from {other.name}, epoch 2,", owner.text()), owner.text()[-3000:]  # fmt: skip
    _wait(lambda: re.search(rf"session {sid8}: (taken over by|moved to) another replica; dropped here", other.text()),
          10, "the other replica dropping the session")  # fmt: skip


def _short_run(data: Path, cloud: str, out: Path, key: str) -> str:
    """A 2-step run on a 16-line CSV whose streams carry routing key ``key``; its session id."""
    out.mkdir(parents=True)
    (out / "route-key").write_text(key + "\n")  # what the run folder keeps: see sft_edge.link.connect
    cfg = TrainConfig(
        train_file=str(data), dev_file=str(data), text_columns="text", label_column="label",
        cloud=cloud, model="random:tiny", batch_size=4, max_steps=2, insecure=True, progress=False,
        output_dir=str(out),
    )  # fmt: skip
    return train(cfg)["session_id"]


@pytest.fixture
def csv_file(tmp_path) -> Path:
    path = tmp_path / "reviews.csv"
    rows = "".join(f"review {i} of 16,{'pos' if i % 2 else 'neg'}\n" for i in range(16))
    path.write_text("text,label\n" + rows)
    return path


def _served_by(cluster: Cluster, sid: str) -> str:
    """The replica whose log says it opened session ``sid``."""
    (name,) = [name for name, r in cluster.replicas.items() if sid[:8] in r.opened()]
    return name


def test_sixteen_runs_spread_over_both_replicas_by_their_key(cluster, csv_file, tmp_path):
    keys = [os.urandom(16).hex() for _ in range(16)]
    with ThreadPoolExecutor(4) as pool:  # as devices would: several at once
        sids = list(
            pool.map(
                lambda i: _short_run(csv_file, cluster.address, tmp_path / f"run{i}", keys[i]), range(16)
            )
        )
    where = {key: _served_by(cluster, sid) for key, sid in zip(keys, sids)}
    counts = {name: list(where.values()).count(name) for name in cluster.replicas}
    assert all(counts.values()), f"the hash sent all 16 runs to one replica: {counts}"
    ports = {r.port: name for name, r in cluster.replicas.items()}
    for key in keys:  # nginx's own log agrees: each key's streams went to one replica
        assert {ports[p] for p in cluster.nginx.upstreams(key)} == {where[key]}


def test_a_killed_replica_fails_over_and_rejoins_when_restarted(cluster, csv_file, tmp_path, tiny_base):
    a = cluster.replicas["a"]
    for i in range(12):  # a key the hash gives to a (each try: one chance in two)
        key = os.urandom(16).hex()
        if _served_by(cluster, _short_run(csv_file, cluster.address, tmp_path / f"find{i}", key)) == "a":
            break
    else:
        raise AssertionError("12 keys in a row went to b: is a in nginx's ring?")
    a.kill()
    assert _served_by(cluster, _short_run(csv_file, cluster.address, tmp_path / "down", key)) == "b"
    a.start()  # on its port: nginx's upstream list is unchanged
    a.wait()
    _warm(a.port, tiny_base)  # its first session loads the model: not what is measured here
    time.sleep(FAIL_TIMEOUT_S + 0.5)  # nginx tries a failed replica again after fail_timeout
    back = _short_run(csv_file, cluster.address, tmp_path / "back", key)
    assert back[:8] in a.opened(since_start=True)
