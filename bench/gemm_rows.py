"""Why batching sessions' steps cannot pay on a CPU: a matrix product's rows a second against its rows (issue 31).

The step batcher (``sft_cloud/sessions/batcher.py``) runs N sessions' rows as one product through
the shared base. That pays where one session's rows leave the hardware idle (a GPU at 256 rows).
This measures whether they do here: the products of one SmolLM2 layer (width 576, FFN 1536) on
M rows, for M from one session's batch to 32 sessions', best of ``--repeats``. If rows a second
are flat in M, one session's step already keeps the CPU busy and N sessions batched cost what N
alone cost (docs/benchmarks.md §8).

    OMP_NUM_THREADS=1 python -m bench.gemm_rows --threads 1
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional, Sequence

import torch

from bench.common import add_output_args, save, table

# (name, inputs, outputs) of a SmolLM2 layer's products (q, k/v at 3 heads of 64: 192, o, gate/up, down)
SHAPES = [("q / o", 576, 576), ("k / v", 576, 192), ("gate / up", 576, 1536), ("down", 1536, 576)]
ROWS = (64, 256, 1024, 2048, 8192)  # 256: one session's 4 x 64 tokens; 2048: 8 of them; 8192: 32


def rows_per_second(m: int, k: int, n: int, repeats: int) -> float:
    """The best of ``repeats`` timings of (m, k) @ (k, n), each over about 8192 rows."""
    x, w = torch.randn(m, k), torch.randn(k, n)
    torch.matmul(x, w)  # warm
    calls = max(1, 8192 // m)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            torch.matmul(x, w)
        best = min(best, (time.perf_counter() - t) / calls)
    return m / best


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    add_output_args(p, "gemm_rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: List[Dict] = []
    for name, k, n in SHAPES:
        rates = {m: rows_per_second(m, k, n, args.repeats) for m in ROWS}
        row: Dict = {"product": f"{name} ({k} x {n})"}
        for m in ROWS:
            row[f"{m} rows"] = f"{rates[m] / 1e3:.1f}k"
        row["8192 / 256"] = rates[8192] / rates[256]
        rows.append(row)
    print(f"rows a second (thousands), {args.threads} thread(s), best of {args.repeats}")
    print(table(rows, ["product", *(f"{m} rows" for m in ROWS), "8192 / 256"]))
    result = {"threads": args.threads, "repeats": args.repeats, "rows": rows}
    print("wrote", save(args.name, result, args.out_dir))
    return result


if __name__ == "__main__":
    main()
