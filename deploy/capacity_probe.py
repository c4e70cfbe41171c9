"""GPU check of docs/scaling.md's capacity figures: the resident bytes of one cloud session (net2
and its AdamW state) and one step's peak above them (batch 32, seq 128, fp32), for the heaviest
cut (the cloud holds every layer but the first), built with transformers alone.

    python deploy/capacity_probe.py            # on a CUDA host
    python deploy/capacity_probe.py --smoke    # anywhere: tiny batch, CPU, shapes only
"""

from __future__ import annotations

import gc
import sys
import time

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

SMOKE = "--smoke" in sys.argv or not torch.cuda.is_available()
DEVICE = "cpu" if SMOKE else "cuda"
B, S = (2, 8) if SMOKE else (32, 128)
SESSIONS = 4  # resident bytes are averaged over this many sessions held at once
MODELS = {
    "MiniLM-L6": BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "BERT-base": BertConfig(),
    "SmolLM2-135M": LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
}  # fmt: skip


def net2(cfg, attn: str) -> torch.nn.ModuleDict:
    """Layers 1..L-1 and a 2-class head; the embeddings stay on the edge."""
    c = cfg.__class__(
        **{**cfg.to_dict(), "num_hidden_layers": cfg.num_hidden_layers - 1, "attn_implementation": attn}
    )
    if isinstance(c, BertConfig):
        body = BertModel(c)
        body.embeddings = None
    else:
        body = LlamaModel(c)
        body.embed_tokens = None
    return torch.nn.ModuleDict({"body": body, "head": torch.nn.Linear(c.hidden_size, 2)}).to(DEVICE)


def step(model: torch.nn.ModuleDict, opt: torch.optim.Optimizer, cfg) -> None:
    """One training step on full-length sequences, as a session applies it."""
    x = torch.randn(B, S, cfg.hidden_size, device=DEVICE, requires_grad=True)
    if isinstance(cfg, BertConfig):
        h = model["body"].pooler(model["body"].encoder(x).last_hidden_state)
    else:
        mask = torch.ones(B, S, dtype=torch.long, device=DEVICE)
        h = model["body"](inputs_embeds=x, attention_mask=mask).last_hidden_state[:, -1]
    loss = torch.nn.functional.cross_entropy(
        model["head"](h), torch.zeros(B, dtype=torch.long, device=DEVICE)
    )
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(name: str, cfg, attn: str) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    sessions, peaks = [], []
    for _ in range(SESSIONS):
        model = net2(cfg, attn).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(model, opt, cfg)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated())
        sessions.append((model, opt))
    del model, opt
    gc.collect()
    resident = (torch.cuda.memory_allocated() - base) / SESSIONS
    n = sum(p.numel() for p in sessions[0][0].parameters())
    torch.cuda.synchronize()
    started = time.time()
    for _ in range(10):
        step(*sessions[0], cfg)
    torch.cuda.synchronize()
    print(
        f"{name} {attn}: net2 {n / 1e6:.2f}M params, resident/session {resident / 2**20:.1f} MiB "
        f"({resident / n:.2f} B/param), one step's peak above that {max(peaks) / 2**30:.2f} GiB, "
        f"step {1000 * (time.time() - started) / 10:.1f} ms",
        flush=True,
    )


def main() -> None:
    print("torch", torch.__version__, torch.cuda.get_device_name(0) if not SMOKE else "CPU (smoke)")
    for name, cfg in MODELS.items():
        if SMOKE:
            model = net2(cfg, "eager").train()
            step(model, torch.optim.AdamW(model.parameters()), cfg)
            print(name, "net2", sum(p.numel() for p in model.parameters()), "parameters: runs")
            continue
        for attn in ("eager", "sdpa"):
            measure(name, cfg, attn)


if __name__ == "__main__":
    main()
