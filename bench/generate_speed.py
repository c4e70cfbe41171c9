"""Seconds and bytes per new token of `sft-edge generate` through the daemon: KV-cached against recomputing.

For each model (a ``random:`` preset: random weights, the real geometry), a U causal-LM session
(split layer 0, rank 8, one tail layer, fp32 on the wire) is opened on a gRPC server in this process
(loopback TCP), closed untrained (the daemon keeps its final weights) and reopened for inference
once per variant and length, as ``sft-edge generate`` reopens a run's session:

- ``cached``: ``sft_edge.finished.cached`` (the head's and the tail's KV caches here, the middle's on
  the daemon): the prompt once, then one ``DecodeStep`` of one row up and one down a token;
- ``recompute``: the path before KV caches (``--no-kv-cache``): each token one ``EvalStep`` over the
  whole sequence, the head and the tail over it here.

Greedy decoding of ``--prompt-tokens`` fixed tokens, never stopping early, for each of
``--lengths`` new tokens: the cached runs ``--reps`` rounds through the lengths in turn (medians
reported), so that load from other processes hits every length alike; the recomputing ones once. Seconds per token: the whole generation's wall time (edge compute, the
link, the daemon's middle; the prompt's pass included) over the new tokens; "last 16": the mean
time of the last 16 tokens, what one more token costs at that length. Bytes per token: both
directions' serialized messages, the prompt included, over the new tokens. The variants' tokens are
checked equal (exactly: fp32 wire).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from typing import Dict, Iterator, List

import torch

from bench.common import median, save, table
from sft_common.models.base_model import BaseModel, load_base_model
from sft_common.topology.ushape import UShapeSpec
from sft_edge.finished.cached import DaemonMiddle, UShapeLM
from sft_edge.finished.generate import NextLogits, decode_with, recompute
from sft_edge.link.transport import GrpcTransport, open_channel
from sft_edge.runs.config import OptimConfig
from sft_edge.sessions.ushape import UShapeSession

SPEC = UShapeSpec(split_layer=0, rank=8, tail_layers=1)
OPTIM = OptimConfig(lr=1e-3, seed=5)
LAST = 16  # the tokens whose mean time is "one more token at this length"


@contextlib.contextmanager
def daemon(base: BaseModel, folder: str) -> Iterator[str]:
    """A gRPC server on a free localhost port that keeps finished sessions in ``folder``."""
    from sft_cloud.daemon.server import ServeConfig, create_server
    from sft_cloud.sessions.registry import SessionRegistry

    registry = SessionRegistry(device="cpu", checkpoint_dir=folder, max_seq=1024)
    registry._bases[base.name] = base  # the model this process already holds
    server, port, _ = create_server(ServeConfig(host="127.0.0.1", port=0, insecure=True), registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def session(base: BaseModel, address: str, max_len: int, **kw) -> UShapeSession:
    def connect() -> GrpcTransport:
        return GrpcTransport(open_channel(address), owns_channel=True)

    return UShapeSession(base, SPEC, 0, connect, OPTIM, 1, max_len, causal_lm=True, **kw)


def measure(
    base: BaseModel, address: str, session_id: str, variant: str, new: int, prompt: List[int]
) -> Dict:
    """One generation of ``new`` tokens through a freshly reopened session."""
    max_len = len(prompt) + new
    s = session(base, address, max_len, session_id=session_id, inference_only=True)
    s.net.eval()
    next_logits: NextLogits
    if variant == "cached":
        next_logits = UShapeLM(s.head, DaemonMiddle(s), s.tail, max_len, "cpu").next_logits
    else:
        next_logits = recompute(s.predict)
    before = s.bytes_sent + s.bytes_received
    stamps: List[float] = []
    t0 = time.monotonic()
    tokens = decode_with(
        next_logits, prompt, new, max_len, on_token=lambda t: stamps.append(time.monotonic())
    )
    seconds = stamps[-1] - t0
    traffic = s.bytes_sent + s.bytes_received - before
    s.close()
    gaps = [b - a for a, b in zip([t0] + stamps, stamps)]
    return {
        "variant": variant,
        "new_tokens": new,
        "s_per_token": seconds / new,
        "s_last16": sum(gaps[-LAST:]) / len(gaps[-LAST:]),
        "bytes_per_token": traffic / new,
        "tokens": tokens,
    }


def run(args: argparse.Namespace) -> List[Dict]:
    rows: List[Dict] = []
    for name in args.models:
        base = load_base_model(name)
        prompt = [101] + [1000 + 7 * k for k in range(args.prompt_tokens - 1)]
        with tempfile.TemporaryDirectory() as folder, daemon(base, folder) as address:
            trained = session(base, address, args.prompt_tokens + max(args.lengths))
            trained.close()  # untrained: the daemon keeps its middle as a finished session
            plan = [(v, n) for v in args.variants for n in args.lengths if n <= args.max_recompute.get(name, n)
                    or v == "cached"]  # fmt: skip
            # the lengths in turn, --reps rounds: load from other processes hits each length alike
            samples: Dict = {key: [] for key in plan}
            for _ in range(args.reps):
                for variant, new in plan:
                    if variant == "recompute" and samples[variant, new]:
                        continue  # once: it is the slow one, and its growth is not in doubt
                    samples[variant, new].append(
                        measure(base, address, trained.session_id, variant, new, prompt)
                    )
                    print(table([{"model": name, **samples[variant, new][-1]}], COLUMNS).splitlines()[-1],
                          file=sys.stderr, flush=True)  # fmt: skip
            rows.extend(summary(name, runs) for runs in samples.values())
            for new in args.lengths:
                tokens = {
                    tuple(run["tokens"]) for (_, n), runs in samples.items() if n == new for run in runs
                }
                if len(tokens) > 1:
                    raise AssertionError(f"{name}, {new} tokens: cached and recomputed tokens differ")
    for row in rows:  # against the recomputing path at the same length
        ref = next((r for r in rows if r["variant"] == "recompute" and r["model"] == row["model"]
                    and r["new_tokens"] == row["new_tokens"]), None)  # fmt: skip
        if ref is not None:
            row["speedup"] = ref["s_per_token"] / row["s_per_token"]
            row["bytes_ratio"] = ref["bytes_per_token"] / row["bytes_per_token"]
    return rows


def summary(name: str, runs: List[Dict]) -> Dict:
    """One row for the runs of one variant and length: the medians of their timings."""
    first = runs[0]
    row = {"model": name, "variant": first["variant"], "new_tokens": first["new_tokens"], "runs": len(runs)}
    for key in ("s_per_token", "s_last16", "bytes_per_token"):
        row[key] = median([r[key] for r in runs])
    return row


COLUMNS = "model variant new_tokens runs s_per_token s_last16 bytes_per_token speedup bytes_ratio".split()


def parse_recompute_caps(values: List[str]) -> Dict[str, int]:
    """MODEL=N pairs: the longest generation the recomputing path runs for MODEL."""
    caps = {}
    for value in values:
        name, _, n = value.rpartition("=")
        caps[name] = int(n)
    return caps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["random:tiny-llama", "random:smollm2"])
    p.add_argument("--lengths", nargs="+", type=int, default=[16, 64, 256], help="new tokens")
    p.add_argument("--variants", nargs="+", default=["cached", "recompute"], choices=["cached", "recompute"])
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument(
        "--reps", type=int, default=2, help="rounds of the cached runs (the recomputing ones run once)"
    )
    p.add_argument(
        "--max-recompute",
        nargs="*",
        default=["random:smollm2=64"],
        help="MODEL=N: run the recomputing path for MODEL up to N new tokens only (it grows as N^2)",
    )
    p.add_argument("--name", default="generate_speed", help="results/<name>.json")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    args.max_recompute = parse_recompute_caps(args.max_recompute)
    torch.manual_seed(0)
    rows = run(args)
    print(table(rows, COLUMNS))
    path = save(
        args.name, {"spec": vars(SPEC), "prompt_tokens": args.prompt_tokens, "rows": rows}, args.out_dir
    )
    print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
