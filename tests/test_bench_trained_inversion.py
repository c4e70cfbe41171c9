"""bench.inversion --trained: the device's cut rows come from the edge half a finished run trained.

Tiny U runs through a live daemon (a classifier, and a causal LM under LoRA, the decoder's U); their
edge half opened by bench.trained_edge holds the weights the run saved, and sends other rows than
the pretrained edge the attacker's decoder learns from.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_completion_rows, write_reviews
from safetensors.torch import load_file

from sft_edge import cli

READINGS = ("", "_restandardised", "_known_weights")  # the decoders each edge's rows are read by


def _train(tmp_path, address, *extra) -> str:
    """A 6-step run through the daemon at a large learning rate (the edge moves), its --output-dir."""
    run = str(tmp_path / "run")
    argv = ["train", "--cloud", address, "--insecure", "--output-dir", run, "--no-progress"]
    argv += ["--batch-size", "4", "--max-steps", "6", "--lr", "3e-2", *extra]
    assert cli.main(argv) == 0
    return run


def _classifier(tmp_path, address, *split) -> str:
    """A U (``--label-private``) classifier, or with ``split`` given, that split."""
    reviews = write_reviews(tmp_path / "train.csv", 24)
    columns = ["--text-columns", "opinion", "--label-column", "verdict"]
    split = split or ("--label-private",)
    return _train(tmp_path, address, "--model", "random:tiny", "--train-file", reviews, *columns, *split)


def _two_part(tmp_path, address) -> str:
    return _classifier(tmp_path, address, "--split-layer", "0")


def _causal_lm(tmp_path, address) -> str:
    rows = write_completion_rows(tmp_path / "train.jsonl", 24)
    lm = ["--problem", "causal-lm", "--model", "random:tiny-llama", "--peft", "lora", "--mode", "sl"]
    lm += ["--label-private", "--wire-dtype", "int4-6-hadamard-grad4"]
    return _train(tmp_path, address, *lm, "--train-file", rows)


@pytest.mark.parametrize(
    "make", [_classifier, _causal_lm, _two_part], ids=["u-classifier", "u-causal-lm-lora", "two-part"]
)
def test_trained_edge_holds_the_runs_weights_and_moves_the_cut(tmp_path, live_server, make):
    """The loaded edge half's tensors are the file's (LoRA adapters included); its rows at the cut
    differ from the pretrained edge half's, which the same builder gives when nothing is loaded."""
    from bench.trained_edge import trained_edge
    from sft_common.models.base_model import load_base_model
    from sft_common.topology.two_part import build_split_model
    from sft_edge.sessions.tail_end import tail_end_of

    run = make(tmp_path, live_server[0])
    edge, record = trained_edge(run)
    weights = load_file(f"{run}/edge.safetensors")  # net1, or the U's head and tail, as the run saved them
    prefix = "head." if record.label_private else ""
    saved = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    state = edge.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k) == bool(record.lora)

    base = load_base_model(record.model)
    pretrained = build_split_model(base, record.split_spec(), 2, 0)[0].eval()
    if record.label_private:  # the U's head, built as trained_edge builds it, nothing loaded
        untrained = tail_end_of(record.causal_lm).model(
            base, record.ushape_spec(), record.num_labels, 0, "cpu"
        )[0]
    else:
        untrained = build_split_model(base, record.split_spec(), record.num_labels, 0)[0]
    ids = torch.randint(5, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    with torch.no_grad():
        before, after = pretrained(ids, mask, types)[0], edge(ids, mask, types)[0]
        assert torch.allclose(untrained.eval()(ids, mask, types)[0], before, atol=1e-6)  # the same edge
    assert before.shape == after.shape and (after - before).norm() > 1e-3 * before.norm()


def test_inversion_after_training_reads_both_edges_with_one_decoder(tmp_path, live_server, glue_dir):
    """One result: the pretrained edge's row and the trained edge's, the same device sentences and
    decoder; the model and the wire are the run's, the file is named for it, and flags that
    contradict the run are refused."""
    from bench import inversion

    run = _classifier(tmp_path, live_server[0])
    args = ["--trained", run, "--public", "sst2:dev", "--private", "sst2:dev", "--sentences", "64", "32"]
    args += ["--epochs", "5", "--data-dir", glue_dir, "--out-dir", str(tmp_path)]
    assert inversion.main(args) == 0
    result = json.loads((tmp_path / "inversion_random_tiny_trained.json").read_text())
    before, after = result["rows"]
    assert (before["edge"], after["edge"]) == ("pretrained", "trained (6 steps)")
    assert before["mode"] == after["mode"] == "SFT R=8" and before["layer"] == after["layer"] == 0
    assert before["width"] == after["width"] == 8
    for row in (before, after):
        assert all(0 <= row[f"{what}{how}"] <= 1 for what in ("tokens", "sentences") for how in READINGS)
    assert before["tokens_known_weights"] == before["tokens"]  # the pretrained edge's is the cloud's decoder
    assert result["trained"]["moved"] > 0 and result["trained"]["steps"] == 6
    assert (result["model"], result["args"]["wire"], result["labels"]) == ("random:tiny", "fp32", [])
    for contradicting in (["--model", "random:tiny-llama"], ["--layers", "0"]):  # the run says them
        with pytest.raises(SystemExit):
            inversion.main(["--trained", run, *contradicting])
