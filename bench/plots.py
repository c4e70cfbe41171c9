"""PNG plots for docs/benchmarks.md from whatever bench/results/*.json exist (matplotlib, no display)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench.common import RESULTS, ROOT, read_json


def _load(folder: str, name: str) -> Optional[Dict]:
    path = os.path.join(folder, name + ".json")
    return read_json(path) if os.path.isfile(path) else None


def traffic(plt, data: Dict) -> None:
    rows = [r for r in data["rows"] if r["compression"] == "none"]
    models = sorted({(r["model"], r["batches"]) for r in rows})
    wires = ["fp32", "fp16", "bf16", "int8"]
    _, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, (model, kind) in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model and r["batches"] == kind]
        ranks = sorted({r["rank"] for r in sub if r["mode"] == "sft"})
        configs = [("sl", None)] + [("sft", k) for k in ranks]
        labels = ["SL"] + [f"SFT R={k}" for k in ranks]
        width = 0.8 / len(wires)
        for i, w in enumerate(wires):
            total = {(r["mode"], r["rank"]): r["total_per_step"] for r in sub if r["wire"] == w}
            vals = [total.get(c, 0) for c in configs]
            ax.bar([x + i * width for x in range(len(labels))], vals, width, label=w)
        ax.set_yscale("log")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=20)
        ax.set_ylabel("bytes per step (both directions)")
        ax.set_title(f"{model}, {kind} batches")
        ax.legend(fontsize=8)


def step_time(plt, results: List[Dict]) -> None:
    """Each part of the step (median), per variant, on a log scale: seconds of compute next to
    the milliseconds that the transport adds."""
    parts = (
        "total edge_compute cloud_compute transfer transfer_and_cloud edge_encode edge_decode"
        " cloud_decode cloud_encode"
    ).split()
    _, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, data in zip(axes[0], results):
        rows = data["rows"]
        height = 0.8 / len(rows)
        for j, row in enumerate(rows):
            ys = [i + j * height for i in range(len(parts))]
            ax.barh(ys, [row.get(p) or 0 for p in parts], height, label=row["variant"])
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(parts))], parts)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median over steps)")
        a = data["args"]
        ax.set_title(f"{a['model']} {a['mode']}" + (f" R={a['rank']}" if a["mode"] == "sft" else ""))
        ax.legend(fontsize=8)


def link(plt, data: Dict) -> None:
    """Left: measured step and its floor. Right: the step minus edge compute (what the link and
    the cloud add), which does not move with the load other processes put on the edge's CPU."""
    _, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    local = [r for r in data["rows"] if r["mode"] == "local"][0]["step_s"]
    for i, mode in enumerate(dict.fromkeys(r["mode"] for r in data["rows"] if r["mode"] != "local")):
        rows = sorted((r for r in data["rows"] if r["mode"] == mode), key=lambda r: r["rate_mbit"])
        rates = [r["rate_mbit"] for r in rows]
        for a, edge in ((ax, 0), (ax2, 1)):  # the right plot less the edge's compute
            for key, style, what in (("step_s", "o-", "measured"), ("floor_s", "x--", "floor")):
                ys = [r[key] - edge * r["edge_s"] for r in rows]
                a.plot(rates, ys, style, color=f"C{i}", label=f"{mode} {what}")
    ax.axhline(local, color="k", linestyle=":", label="local (edge alone)")
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_xlabel("link rate (Mbit/s, tbf on a veth pair)")
        a.legend(fontsize=8)
    ax.set_ylabel("seconds per step")
    ax2.set_yscale("log")
    ax2.set_ylabel("step minus edge compute (s)")


def memory(plt, data: Dict) -> None:
    rows = data["rows"]
    _, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [r["run"] if r["split_layer"] == "-" else f"edge l={r['split_layer']}" for r in rows]
    ax.bar(labels, [r["idle_mib"] for r in rows], label="before the model (runtime)", color="C7")
    ax.bar(labels, [r["train_mib"] for r in rows], bottom=[r["idle_mib"] for r in rows], label="training")
    ax.scatter(
        labels,
        [r["idle_mib"] + r["counted_mib"] for r in rows],
        marker="_",
        s=900,
        color="k",
        label="runtime + counted tensors",
        zorder=3,
    )
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_ylim(0, 1.3 * max(r["peak_mib"] for r in rows))  # room for the legend
    ax.legend(fontsize=8, loc="upper left")
    edges = [r for r in rows if r["split_layer"] != "-"]
    xs = [str(r["split_layer"]) for r in edges]
    for key, style, label in (
        ("moved_share", "k--o", "moved to the cloud (counted)"),
        ("saved_share", "C1-o", "edge saves (peak RSS)"),
        ("counted_saved_share", "C2-s", "edge saves (counted)"),
    ):
        ax2.plot(xs, [100 * r[key] for r in edges], style, label=label)
    ax2.set_xlabel("split layer l")
    ax2.set_ylabel("% of local training memory")
    ax2.legend(fontsize=8)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(args.out, exist_ok=True)
    made = []
    steps = [d for d in (_load(args.results, "step_time_sft"), _load(args.results, "step_time_sl")) if d]
    plots: List[Tuple[str, Callable[..., None], Any]] = [
        ("traffic.png", traffic, _load(args.results, "traffic")),
        ("step_time.png", step_time, steps),
        ("link.png", link, _load(args.results, "link")),
        ("memory.png", memory, _load(args.results, "memory")),
    ]
    for png, draw, data in plots:
        if data:
            draw(plt, data)
            plt.tight_layout()
            plt.savefig(os.path.join(args.out, png), dpi=110)
            made.append(png)
    plt.close("all")
    print("wrote " + ", ".join(os.path.join(args.out, x) for x in made) if made else "no results to plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
