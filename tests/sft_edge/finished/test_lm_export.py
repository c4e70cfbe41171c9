"""A causal LM with no daemon: `--local` training, and the export of a U-shaped run.

`sft-edge train --local --problem causal-lm` trains Hugging Face's causal LM in one process (the
baseline the U is compared with); its step-0 evaluation is the unsplit base model, which at full
rank with the residuals kept is also the U's function. `sft-edge export` of a U causal-LM run
fetches the daemon's middle once; the folder then generates here, the same greedy tokens as
through the daemon.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import write_completion_rows

from sft_edge import cli
from sft_edge.data.glue import DataError
from sft_edge.finished import predict
from sft_edge.finished.generate import generate
from sft_edge.runs.config import Connection, ExportConfig, GenerateConfig

PROMPT = "red green blue"


def _train(tmp_path, *extra, model="random:tiny-llama", steps=6):
    run = str(tmp_path / "run")
    argv = [
        "train", "--problem", "causal-lm", "--train-file", write_completion_rows(tmp_path / "train.jsonl", 24),
        "--dev-file", write_completion_rows(tmp_path / "dev.jsonl", 6, 100), "--model", model, "--batch-size", "4",
        "--max-steps", str(steps), "--lr", "1e-3", "--no-progress", "--output-dir", run,
        "--report", str(tmp_path / "r.json"), *extra,
    ]  # fmt: skip
    assert cli.main(argv) == 0
    return run, json.loads((tmp_path / "r.json").read_text())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_local_causal_lm_learns_reports_perplexity_and_its_folder_generates(tmp_path, lora):
    """The dev loss falls from the base model's (step 0) and the saved folder gives back the
    final evaluation (1e-5) and generates with no daemon."""
    from transformers import AutoTokenizer

    from sft_edge.data.lm import collate_lm, lm_loss_sum, load_lm_file
    from sft_edge.finished.parts import open_model
    from sft_edge.finished.record import read_run

    run, report = _train(tmp_path, "--local", *(["--peft", "lora"] if lora else []), steps=12)
    history = report["eval_history"]
    assert [e["step"] for e in history] == [0, 6, 12] and report["mode"] == "local"
    assert history[-1]["loss"] < history[0]["loss"] and report["train_loss_last"] < report["train_loss_first"]
    assert report["metrics"]["perplexity"] == pytest.approx(
        torch.tensor(report["metrics"]["loss"]).exp().item(), rel=1e-6
    )
    assert report["bytes_sent"] == report["bytes_received"] == 0
    record = read_run(run)
    assert (record.part, record.problem, record.num_labels) == ("full", "causal-lm", 0)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(run, "model.safetensors"))
    assert any("lora_" in k for k in saved) == lora and ("lm_head.weight" in saved) != lora

    logits_of = open_model(run, record).logits
    data = load_lm_file(str(tmp_path / "dev.jsonl"), AutoTokenizer.from_pretrained(run), 128)
    batch = collate_lm(data, range(len(data)))
    summed, count = lm_loss_sum(logits_of(batch).float(), batch.labels)
    assert float(summed) / count == pytest.approx(report["metrics"]["loss"], abs=1e-5)
    out = generate(GenerateConfig(run, PROMPT, max_new_tokens=4))  # no daemon, no connection
    assert len(out["tokens"]) == 4 and out["stopped"] == "max_new_tokens"


def test_the_local_causal_lm_is_the_u_at_full_rank_with_residuals_kept():
    """Step 0: --local's model gives the logits of the U's three parts at full rank with both
    residuals kept (1e-4), for an untied (Llama) and a tied (GPT-2) LM head."""
    from sft_common.models.base_model import load_base_model
    from sft_common.topology.ushape import UShapeSpec
    from sft_common.topology.ushape_lm import TiedLMHead, build_causal_lm, build_ushape_lm_model
    from sft_edge.data.lm import IGNORE, LMEncoded, collate_lm

    batch = collate_lm(
        LMEncoded([[1100, 1200, 1300, 1400, 1500], [1600, 1700, 1800]], [[IGNORE] * 5, [IGNORE] * 3]), [0, 1]
    )
    for name in ("random:tiny-llama", "random:tiny-gpt2"):
        base = load_base_model(name)
        model = build_causal_lm(base, seed=3).eval()
        assert isinstance(model.lm_head, TiedLMHead) == bool(base.config.tie_word_embeddings)
        spec = UShapeSpec(split_layer=0, rank=base.hidden_size, tail_layers=1, keep_residual=True)
        head, middle, tail = (p.eval() for p in build_ushape_lm_model(base, spec, seed=3))
        with torch.no_grad():
            cut, residual = head(batch.input_ids, batch.attention_mask)
            second, residual2 = middle(cut, batch.attention_mask, residual)
            ours = tail(second, batch.attention_mask, residual2)
            whole = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mask = batch.attention_mask.bool()
        assert float((ours[mask] - whole[mask]).abs().max()) <= 1e-4, name


def test_the_ffn_input_u_at_full_rank_starts_at_the_local_perplexity(tmp_path, recorded):
    """`--label-private --factorise ffn-input --rank <hidden>` through the daemon: no residual is
    kept aside, yet step 0's dev perplexity is --local's (the unsplit base model's)."""
    address, _, _ = recorded
    (tmp_path / "local").mkdir()
    (tmp_path / "u").mkdir()
    local = _train(tmp_path / "local", "--local", steps=2)[1]
    hidden = "32"  # random:tiny-llama's hidden size
    extra = [
        "--label-private",
        "--factorise",
        "ffn-input",
        "--rank",
        hidden,
        "--cloud",
        address,
        "--insecure",
    ]
    u = _train(tmp_path / "u", *extra, steps=2)[1]
    assert u["eval_history"][0]["step"] == local["eval_history"][0]["step"] == 0
    assert u["eval_history"][0]["loss"] == pytest.approx(local["eval_history"][0]["loss"], abs=1e-5)
    assert u["eval_history"][0]["perplexity"] == pytest.approx(
        local["eval_history"][0]["perplexity"], rel=1e-5
    )


@pytest.mark.parametrize(
    "model, lora, factorise",
    [
        ("random:tiny-llama", False, "ffn-output"),
        ("random:tiny-llama", True, "ffn-output"),
        ("random:tiny-gpt2", False, "ffn-output"),
        ("random:tiny-llama", True, "ffn-input"),
        ("random:tiny-llama", True, None),  # the default: full width through int4-6-hadamard-grad4
    ],
    ids=["llama-untied", "llama-untied-lora", "gpt2-tied", "llama-ffn-input-lora", "llama-default-lora"],
)
def test_export_of_a_u_causal_lm_generates_here_as_through_the_daemon(
    tmp_path, recorded, model, lora, factorise
):
    """The export holds the edge's head and LM tail and the daemon's middle (as it kept it, the
    factors factorised); greedy tokens with no daemon = greedy tokens through the daemon."""
    from safetensors.torch import load_file

    address, registry, _ = recorded
    extra = ["--label-private", "--cloud", address, "--insecure", *(["--peft", "lora"] if lora else [])]
    extra += ["--mode", "sft", "--factorise", factorise] if factorise else []
    run, report = _train(tmp_path, *extra, model=model)
    assert (report["mode"], report["wire_dtype"]) == (
        ("sft", "fp32") if factorise else ("sl", "int4-6-hadamard-grad4")
    )
    start = report["start_check"]  # step 0 against the unsplit model, on the same dev rows
    assert start["split_loss"] == report["eval_history"][0]["loss"]
    assert abs(start["excess"]) < (0.05 if factorise else 0.005)  # random weights: R=8 costs under 1 %
    assert report["eval_history"][0]["step"] == 0  # the U's function before training, factorised
    conn = Connection(cloud=address, insecure=True)
    remote = generate(GenerateConfig(run, PROMPT, max_new_tokens=6, connection=conn))
    out = str(tmp_path / "export")
    predict.export(ExportConfig(run, out, conn))
    final = f"{registry.checkpoint_dir}/{report['session_id']}/final.safetensors"
    assert load_file(f"{out}/cloud.safetensors").keys() == load_file(final).keys()
    factor = "u.weight" if factorise == "ffn-output" else "a.weight"  # u2 or A2: factorised
    assert any(k.endswith(factor) for k in load_file(f"{out}/cloud.safetensors")) == bool(factorise)
    info = json.loads(open(f"{out}/sft_edge.json").read())
    assert info["part"] == "ushape" and info["weights"] == ["edge.safetensors", "cloud.safetensors"]
    here = generate(GenerateConfig(out, PROMPT, max_new_tokens=6))  # no connection: no daemon
    assert len(here["tokens"]) == len(remote["tokens"]) == 6
    if factorise:  # an fp32 wire: the same function here as through the daemon, so the same tokens
        assert here["tokens"] == remote["tokens"]
    # (int4-6-hadamard-grad4: the daemon's path rounds at both cuts, the export's runs exact; on this random
    # model's flat logits that changes the greedy tokens, on SmolLM2 the perplexity by under 1 %.)
    with pytest.raises(DataError, match="holds a causal LM: it generates text"):
        from sft_edge.finished.trained import load_trained

        load_trained(out)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--local", "--label-private"], "--label-private is a split with the cloud"),
        (["--local", "--micro-batches", "2"], "--local has no link"),
        (["--local", "--text-columns", "x", "--label-column", "y"], "takes no --text-columns"),
        (["--local", "--factor-lr", "1e-3"], "--factor-lr needs --mode sft"),
    ],
)
def test_local_causal_lm_refuses_nonsense_at_once(tmp_path, capsys, extra, message):
    argv = [
        "train",
        "--problem",
        "causal-lm",
        "--train-file",
        write_completion_rows(tmp_path / "t.jsonl", 4),
        *extra,
    ]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
