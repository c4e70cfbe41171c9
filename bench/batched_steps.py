"""Aggregate session-steps per second of concurrent LoRA sessions on one daemon: batched
(``--batch-window-ms``) against one at a time (window 0, as before the step batcher).

For each model and each count of sessions, a fresh ``SessionRegistry`` holds that many U-shaped
LoRA sessions (the cloud's middle, LoRA rank 8 on the family's default targets, SFT rank 8 at both
cuts) on one shared frozen base, each driven by its own thread as an edge's stream would: every
step sends 4 x 64 tokens of random activations up (``forward_up``), then a random gradient
(``gradient_up``), through the sessions' real message path (decode, validate, compute, encode)
without the network. One warm-up step is not timed (it builds the batched part and lets every
session be seen); then ``--steps`` steps are. The table gives session-steps/s over all sessions,
the speed-up of batched over one at a time, the mean wall time of a session's step (for one
session alone: its step latency) and the sessions a forward batch held on average. The compute
columns time what batching changes, alone: the sessions' forward and backward as one batch
against one after another, in one thread with no messages (median of ``--repeats`` rounds).
``--repeats`` runs each mode that many times, alternating, and keeps the medians.

``--phase eval``: forward-only sessions instead (``FrozenMiddleSession``: the same cuts, the
middle frozen and shared, no LoRA), each thread sending ``EvalStep``s of 4 x 64 tokens; the table
gives evaluations/s, and the compute columns time one forward of the N sessions' rows against N
forwards. Usage:
python -m bench.batched_steps --models random:tiny-llama random:smollm2 --sessions 1 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from bench.common import add_output_args, save, table
from sft_cloud.sessions.batcher import Job, StepBatcher
from sft_cloud.sessions.frozen import FrozenMiddleSession
from sft_cloud.sessions.middle import MiddleSession
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.models.base_model import BaseModel, load_base_model
from sft_common.proto import sft_pb2 as pb
from sft_common.wire import codec

ROWS, SEQ = 4, 64  # each session's step: 4 sequences of 64 tokens


def u_config(base: BaseModel, i: int, split_layer: int, tail_layers: int) -> pb.SessionConfig:
    """Session ``i``'s U with LoRA (its own seed and learning rate)."""
    return pb.SessionConfig(
        model=base.name, mode=pb.SFT, split_layer=split_layer, rank=8, num_labels=0, wire_dtype=pb.FLOAT32,
        lr=1e-4 * (1 + i % 4), total_steps=1000, seed=100 + i, max_batch_size=ROWS, max_seq_len=SEQ,
        label_private=True, tail_layers=tail_layers, lora_rank=8, lora_alpha=16.0,
    )  # fmt: skip


class Steps:
    """The U's LoRA steps: ``forward_up`` then ``gradient_up`` (batched by their forward)."""

    unit, batch_phase = "steps", "forward"

    @staticmethod
    def session(
        base: BaseModel, i: int, split_layer: int, tail_layers: int, registry: SessionRegistry
    ) -> Any:
        config = u_config(base, i, split_layer, tail_layers)
        return MiddleSession(f"s{i}", "bench", config, base, registry.host, registry._shared(config, base))

    @staticmethod
    def send(session: Any, k: int, up: pb.Tensor) -> None:
        down = session.forward_up(pb.ForwardUp(step=k, activations=up, lengths=[SEQ] * ROWS)).activations
        session.gradient_up(pb.GradientUp(step=k, grad=down))  # a gradient of the right shape

    @staticmethod
    def compute(sessions: List[Any], rounds: int) -> Dict:
        return compute_seconds(sessions, rounds)


class Evaluations:
    """Forward-only sessions' evaluations through the frozen middle (batched as ``eval``)."""

    unit, batch_phase = "evals", "eval"

    @staticmethod
    def session(
        base: BaseModel, i: int, split_layer: int, tail_layers: int, registry: SessionRegistry
    ) -> Any:
        config = u_config(base, i, split_layer, tail_layers)
        config.mode, config.lora_rank, config.lora_alpha, config.forward_only = pb.SL, 0, 0.0, True
        return FrozenMiddleSession(
            f"s{i}", "bench", config, base, registry.host, registry._shared(config, base)
        )

    @staticmethod
    def send(session: Any, k: int, up: pb.Tensor) -> None:
        session.evaluate(pb.EvalStep(batch=k, activations=up, lengths=[SEQ] * ROWS))

    @staticmethod
    def compute(sessions: List[Any], rounds: int) -> Dict:
        return eval_compute_seconds(sessions, rounds)


PHASES: Dict[str, Any] = {"step": Steps, "eval": Evaluations}  # --phase: what each session sends


def measure(
    phase: Any, base: BaseModel, n: int, window_ms: float, steps: int, split_layer: int, tail_layers: int
) -> Dict:
    """``n`` sessions stepping (or evaluating) together: session-steps/s and each one's mean wall time."""
    registry = SessionRegistry(max_sessions=n, batcher=StepBatcher(window_ms / 1000, max_rows=1024))
    registry._bases[base.name] = base
    sizes: List[int] = []  # sessions in each timed forward batch
    timing = [False]

    def report(batch_phase: str, size: int, waits: List[float]) -> None:
        if batch_phase == phase.batch_phase and timing[0]:
            sizes.append(size)

    registry.batcher.report = report
    sessions = []
    for i in range(n):
        session = phase.session(base, i, split_layer, tail_layers, registry)
        registry._hold(session, None)
        sessions.append(session)
    start = threading.Barrier(n + 1, action=lambda: timing.__setitem__(0, True))
    latencies: List[float] = []

    def drive(session: Any, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        up = [codec.encode(torch.randn(ROWS * SEQ, session.width, generator=g)) for _ in range(2)]
        for k in range(steps + 1):
            if k == 1:
                start.wait()
            began = time.perf_counter()
            phase.send(session, k, up[k % 2])
            if k >= 1:
                latencies.append(time.perf_counter() - began)

    threads = [threading.Thread(target=drive, args=(s, i)) for i, s in enumerate(sessions)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    return {
        "session_steps_per_s": n * steps / seconds,
        "step_s": sum(latencies) / len(latencies),
        "mean_batch": sum(sizes) / len(sizes) if sizes else 1.0,
    }


def compute_seconds(sessions: List[MiddleSession], rounds: int) -> Dict:
    """The compute alone (no messages, no threads): the sessions' forward and backward run as
    one batch (``StepBatcher.compute``), and one session after another; the median of ``rounds``
    alternating rounds, in seconds."""
    batcher = StepBatcher(1.0)

    def jobs(members: List[MiddleSession]) -> List[Job]:
        out = []
        for session in members:
            x = torch.randn(ROWS * SEQ, session.width).requires_grad_(True)
            padded, mask = session.inputs.unpack(x, [SEQ] * ROWS)
            job = Job(session, 1, (padded, mask), lambda _: None, x=x)
            job.finish = functools.partial(_rows, job, mask)
            out.append(job)
        return out

    times: Dict[str, List[float]] = {"batched": [], "alone": []}
    for r in range(rounds + 1):  # the first round warms up
        for how, groups in (("batched", [sessions]), ("alone", [[s] for s in sessions])):
            began = time.perf_counter()
            for group in groups:
                batcher.compute(jobs(group))
            for session in sessions:
                session.core.optimizer.zero_grad(set_to_none=True)
            if r:
                times[how].append(time.perf_counter() - began)
    return {how: statistics.median(t) for how, t in times.items()}


def eval_compute_seconds(sessions: List[FrozenMiddleSession], rounds: int) -> Dict:
    """The compute alone of forward-only evaluations: one forward of every session's rows (what
    the batcher runs) against one forward per session; the median of ``rounds`` alternating rounds."""
    inputs = [s.inputs.unpack(torch.randn(ROWS * SEQ, s.width), [SEQ] * ROWS) for s in sessions]
    together = [torch.cat(t) for t in zip(*inputs)]
    times: Dict[str, List[float]] = {"batched": [], "alone": []}
    for r in range(rounds + 1):  # the first round warms up
        for how in ("batched", "alone"):
            began = time.perf_counter()
            with torch.no_grad():
                if how == "batched":
                    sessions[0].forward(*together)
                else:
                    for session, (padded, mask) in zip(sessions, inputs):
                        session.forward(padded, mask)
            if r:
                times[how].append(time.perf_counter() - began)
    return {how: statistics.median(t) for how, t in times.items()}


def _rows(job: Job, mask: torch.Tensor, out: Any) -> torch.Tensor:
    """A U job's ``finish`` in the compute benchmark: its rows, the backward's start (a gradient of ones)."""
    job.roots = out[0][mask]
    job.grad = torch.ones_like(job.roots)
    return job.roots


def run(args: argparse.Namespace) -> List[Dict]:
    torch.set_num_threads(args.threads)
    phase = PHASES[args.phase]
    per_s, one = f"{phase.unit}_per_s", f"{phase.unit[:-1]}_s"  # steps_per_s, step_s (evals, eval)
    rows = []
    for name in args.models:
        base = load_base_model(name)
        layers = base.num_hidden_layers
        split = max(0, layers - 1 - args.tail_layers - args.middle_layers) if args.middle_layers else 0
        for n in args.sessions:
            runs: Dict[str, List[Dict]] = {"alone": [], "batched": []}
            for _ in range(args.repeats):  # alternating, so that a change of load hits both
                for how, window in (("alone", 0.0), ("batched", args.window_ms)):
                    runs[how].append(measure(phase, base, n, window, args.steps, split, args.tail_layers))
            alone, batched = (_median(runs[how]) for how in ("alone", "batched"))
            registry = SessionRegistry(max_sessions=n)
            registry._bases[base.name] = base
            sessions = [phase.session(base, i, split, args.tail_layers, registry) for i in range(n)]
            compute = phase.compute(sessions, args.repeats)
            row = {
                "model": name, "sessions": n, "middle_layers": layers - 1 - args.tail_layers - split,
                f"alone_{per_s}": alone["session_steps_per_s"],
                f"batched_{per_s}": batched["session_steps_per_s"],
                "speedup": batched["session_steps_per_s"] / alone["session_steps_per_s"],
                f"alone_{one}": alone["step_s"], f"batched_{one}": batched["step_s"],
                "mean_batch": batched["mean_batch"],
                "compute_alone_s": compute["alone"], "compute_batched_s": compute["batched"],
                "compute_speedup": compute["alone"] / compute["batched"],
            }  # fmt: skip
            print(table([row], columns(phase)).splitlines()[-1], flush=True)
            rows.append(row)
    return rows


def _median(runs: List[Dict]) -> Dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def columns(phase: Any) -> str:
    """The table's columns: session-steps (or evaluations) per second, then the compute's."""
    unit, one = phase.unit, phase.unit[:-1]
    return (
        f"model sessions middle_layers alone_{unit}_per_s batched_{unit}_per_s speedup alone_{one}_s "
        f"batched_{one}_s mean_batch compute_alone_s compute_batched_s compute_speedup"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["random:tiny-llama", "random:smollm2"])
    p.add_argument("--sessions", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--steps", type=int, default=3, help="timed steps per session (after one warm-up step)")
    p.add_argument("--window-ms", type=float, default=5.0, help="the batched runs' --batch-window-ms")
    p.add_argument(
        "--middle-layers", type=int, default=0,
        help="cut so the cloud's middle holds this many layers (0: split layer 0, every layer but the tail's)",
    )  # fmt: skip
    p.add_argument("--tail-layers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="runs of each mode, alternating; medians kept")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument(
        "--phase",
        choices=sorted(PHASES),
        default="step",
        help="step: LoRA sessions' steps; eval: forward-only sessions' evaluations (results/batched_evals.json)",
    )
    add_output_args(p)
    args = p.parse_args(argv)
    args.name = args.name or {"step": "batched_steps", "eval": "batched_evals"}[args.phase]
    print(table([], columns(PHASES[args.phase])))
    rows = run(args)
    conditions = {
        "phase": args.phase,
        "threads": args.threads,
        "window_ms": args.window_ms,
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": ROWS,
        "seq": SEQ,
    }
    path = save(args.name, {"conditions": conditions, "rows": rows}, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
