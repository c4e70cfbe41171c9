"""Step 0 of a split causal LM against the unsplit model: measured on the same dev rows, warned over 5 %."""

from __future__ import annotations

import logging

import pytest
from helpers import write_completion_rows

from sft_edge.runs.config import TrainConfig
from sft_edge.runs.problems import evaluate_lm
from sft_edge.runs.setup import prepare
from sft_edge.runs.start_check import THRESHOLD, UnsplitLM, start_check


@pytest.fixture(scope="module")
def u_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    rows = write_completion_rows(folder / "train.jsonl", 16)
    cfg = TrainConfig(problem="causal-lm", train_file=rows, model="random:tiny-llama", label_private=True)
    return prepare(cfg)


def test_the_unsplit_loss_is_the_whole_models_and_a_broken_start_warns(u_run, caplog):
    from sft_common.topology.ushape_lm import build_causal_lm

    run = u_run
    whole = evaluate_lm(UnsplitLM(build_causal_lm(run.base, run.cfg.seed).eval()), run.dev_data, 4, "cpu")[
        "loss"
    ]
    with caplog.at_level(logging.WARNING, logger="sft_edge"):
        near = start_check(run.cfg, run, whole * (1 + THRESHOLD / 2))
    assert near["unsplit_loss"] == pytest.approx(whole, rel=1e-6) and near["excess"] == pytest.approx(
        THRESHOLD / 2
    )
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="sft_edge"):
        far = start_check(run.cfg, run, whole * 1.5)
    assert far["excess"] == pytest.approx(0.5)
    (record,) = caplog.records
    # the default U of a decoder is the full width: the advice names the wire
    assert "50% above the unsplit model's" in record.getMessage()
    assert "--wire-dtype int4-6-hadamard-grad4 rounds the hidden states too coarsely" in record.getMessage()


def test_the_advice_for_a_rank_r_cut_is_the_full_width(u_run, caplog):
    import dataclasses

    run = dataclasses.replace(u_run, cfg=dataclasses.replace(u_run.cfg, mode="sft", wire_dtype="fp32"))
    with caplog.at_level(logging.WARNING, logger="sft_edge"):
        start_check(run.cfg, run, 1e3)
    assert (
        "rank-8 cut drops the decoder's residual stream: train with --mode sl"
        in caplog.records[0].getMessage()
    )
