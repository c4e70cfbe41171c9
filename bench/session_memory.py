"""Cloud memory per added session: full fine-tuning against LoRA on one shared frozen base.

One child process per mode builds ``--sessions`` cloud sessions of one model and split (as the
daemon's registry does: LoRA sessions share the frozen base), runs one training step in each (so
AdamW's state exists), and reads its resident set (VmRSS) after each. Usage:
python -m bench.session_memory --model random:smollm2 --sessions 8 [--split-layer 15]
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Dict, List

from bench.common import proc_status, run_child, save, table


def child(args: argparse.Namespace) -> Dict:
    from bench.harness import random_step, session_config
    from sft_cloud.sessions.two_part import TwoPartSession as CloudSession
    from sft_common.models.base_model import load_base_model

    base = load_base_model(args.model)
    layer = args.split_layer if args.split_layer is not None else base.num_hidden_layers - 1
    lora = args.mode == "lora"
    config = session_config(
        base, layer, lr=2e-5, total_steps=10, seed=42, lora_rank=8 * lora, lora_alpha=16.0 * lora
    )
    shared: Dict = {}
    gc.collect()
    rss = [proc_status()["VmRSS"]]  # KiB, with the base model loaded
    sessions = []
    for k in range(args.sessions):
        s = CloudSession(f"s{k}", "bench", config, base, shared_base=shared if lora else None)
        s.train(random_step(0, [16] * 8))
        sessions.append(s)
        gc.collect()
        rss.append(proc_status()["VmRSS"])
    trainable = sum(p.numel() for p in sessions[0].net2.parameters() if p.requires_grad)
    total = sum(p.numel() for p in sessions[0].net2.parameters())
    return {"rss_kib": rss, "net2_params": total, "trainable_params": trainable}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:smollm2")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--split-layer", type=int)
    p.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # the child's
    p.add_argument("--name", default="session_memory")
    p.add_argument("--out-dir")
    args = p.parse_args()
    if args.mode:
        print(__import__("json").dumps(child(args)))
        return 0
    from sft_common.models.base_model import load_base_model

    base = load_base_model(args.model)
    base_mib = _size_mib(base)
    rows: List[Dict] = []
    extra = ["--model", args.model, "--sessions", str(args.sessions)]
    extra += ["--split-layer", str(args.split_layer)] if args.split_layer is not None else []
    for mode in ("full", "lora"):
        out = run_child("bench.session_memory", [*extra, "--mode", mode])
        rss = out["rss_kib"]
        per = [(b - a) / 1024 for a, b in zip(rss, rss[1:])]
        rows.append(
            {
                "mode": mode,
                "sessions": args.sessions,
                "net2 params": out["net2_params"],
                "trainable": out["trainable_params"],
                "first session (MiB)": per[0],
                "each later (MiB, mean)": sum(per[1:]) / max(1, len(per) - 1),
                "later / base model": sum(per[1:]) / max(1, len(per) - 1) / base_mib,
                "rss_kib": rss,
            }
        )
    print(f"{args.model}: base model {base_mib:.0f} MiB (float32); RSS of one daemon process per mode")
    print(table(rows, [k for k in rows[0] if k != "rss_kib"]))
    print("wrote", save(args.name, {"base_mib": base_mib, "rows": rows, "args": vars(args)}, args.out_dir))
    return 0


def _size_mib(base) -> float:
    """The base model's weights: its safetensors files, or a random model's tensors."""
    import os

    if base.random_state is not None:
        return sum(t.numel() * t.element_size() for t in base.random_state.values()) / 2**20
    return sum(os.path.getsize(p) for p in base.weight_files) / 2**20


if __name__ == "__main__":
    sys.exit(main())
