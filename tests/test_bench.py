"""The benchmarks run (tiny model, seconds); their numbers are measured by `make bench-*`, not here."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_traffic_sizes_are_what_the_transport_counts():
    from bench import traffic

    args = argparse.Namespace(
        ranks=[4],
        split_layer=None,
        seq=16,
        batch_size=4,
        wires=["fp32", "fp16"],
        compressions=["none", "lz4"],
        full_step=False,
    )
    rows = traffic.measure(args, "random:tiny", "fixed", 1, False)
    by = {(r["mode"], r["rank"], r["wire"], r["compression"]): r for r in rows}
    sft = by[("sft", 4, "fp32", "none")]
    # 4 x 16 tokens x 4 wide x 4 bytes, plus a few dozen bytes of fields and framing.
    assert sft["analytic_per_direction"] == 4 * 16 * 4 * 4
    assert 0 < sft["sent_per_step"] - sft["analytic_per_direction"] < 100
    assert 0 < sft["received_per_step"] - sft["analytic_per_direction"] < 100
    assert by[("sft", 4, "fp16", "none")]["sent_per_step"] < sft["sent_per_step"] / 1.8
    assert by[("sl", None, "fp32", "none")]["vs_sl_fp32"] == 1.0
    assert 4 < sft["vs_sl_fp32"] <= 8  # hidden 32 / R 4 = 8, less the fixed overhead


def test_traffic_label_private_sends_both_cuts_each_way(tmp_path):
    """--label-private: a U step sends â1 and ∂â2 and receives â2 and ∂â1, each (tokens, width) in
    the wire dtype. At fp32 the bytes equal those four messages built from the shapes alone."""
    import torch

    from bench import traffic
    from sft_common.proto import sft_pb2 as pb
    from sft_common.wire import codec

    argv = [
        "--models",
        "random:tiny",
        "--kinds",
        "fixed",
        "--ranks",
        "4",
        "--wires",
        "fp32",
        "fp16",
        "--compressions",
        "none",
        "--batch-size",
        "4",
        "--seq",
        "16",
        "--label-private",
        "--out-dir",
        str(tmp_path),
    ]
    assert traffic.main(argv) == 0
    rows = json.loads((tmp_path / "traffic.json").read_text())["rows"]
    by = {(r["shape"], r["mode"], r["wire"]): r for r in rows}
    assert len(by) == len(rows) == 8 and {r["split_layer"] for r in rows if r["shape"] == "U"} == {0}
    tokens = 4 * 16
    for mode, width in (("sft", 4), ("sl", 32)):
        rows_of = codec.encode(torch.zeros(tokens, width))  # fp32: the size does not depend on the values
        up = pb.EdgeMessage(forward_up=pb.ForwardUp(activations=rows_of, lengths=[16] * 4)).ByteSize()
        up += pb.EdgeMessage(gradient_up=pb.GradientUp(grad=rows_of)).ByteSize()
        down = pb.CloudMessage(forward_down=pb.ForwardDown(activations=rows_of)).ByteSize()
        down += pb.CloudMessage(gradient_down=pb.GradientDown(grad=rows_of)).ByteSize()
        u, two = by[("U", mode, "fp32")], by[("two-part", mode, "fp32")]
        assert (u["sent_per_step"], u["received_per_step"]) == (up, down)
        payload = u["analytic_per_direction"]
        assert payload == 2 * tokens * width * 4 == 2 * two["analytic_per_direction"]
        assert 0 < up - payload < 80 and 0 < down - payload < 40  # step, tags, shape, lengths
        half = by[("U", mode, "fp16")]  # half the payload, plus a scale
        assert 0 < half["sent_per_step"] - payload / 2 < 100 and half["received_per_step"] < down / 1.8
    assert 7 < by[("U", "sft", "fp32")]["vs_sl_fp32"] <= 8  # the U's SL: hidden 32 / R 4, less framing


def test_traffic_cheap_capture_matches_a_full_training_step():
    """The benchmark's forward-only capture sends exactly the messages a full step sends."""
    from bench import traffic
    from bench.harness import batches
    from sft_common.models.base_model import load_base_model
    from sft_common.topology.spec import SplitSpec

    base = load_base_model("random:tiny")
    batch = batches(base, "fixed", 1, batch_size=3, seq=10)[0]
    spec = SplitSpec(split_layer=2, rank=4)
    full = traffic.capture_step(base, spec, batch, 10, full_step=True)
    cheap = traffic.capture_step(base, spec, batch, 10, full_step=False)
    assert full[2:] == cheap[2:]
    assert full[0] == cheap[0] and full[1] == cheap[1]


def test_step_time_breakdown_runs(tmp_path):
    from bench import step_time

    args = argparse.Namespace(
        model="random:tiny",
        kind="fixed",
        mode="sft",
        rank=4,
        split_layer=None,
        wire="fp32",
        compression="none",
        batch_size=2,
        seq=8,
        batches=1,
        warmup=0,
        reps=1,
        variants=["inproc", "grpc"],
        device="cpu",
    )
    rows = step_time.run(args)
    assert [r["variant"] for r in rows] == ["inproc", "grpc"]
    for r in rows:
        assert r["total"] > 0 and r["cloud_compute"] > 0 and r["edge_compute"] > 0
        assert r["transfer"] >= 0


def test_memory_accounting_adds_up():
    """The per-side counts add up to the real tensors; the moved share falls as the cut moves up."""
    from bench import memory_accounting as acc
    from bench.harness import batches
    from sft_common.models.base_model import load_base_model
    from sft_common.topology.spec import SplitSpec
    from sft_common.topology.two_part import build_full_model, build_split_model

    base = load_base_model("random:tiny")
    batch = batches(base, "fixed", 1, batch_size=2, seq=8)[0]
    kinds = acc.account_local(base, batch)
    full = build_full_model(base, 2, 42)
    assert kinds["params"] == sum(p.numel() * p.element_size() for p in full.parameters())
    assert kinds["grads"] == kinds["params"]  # every parameter trains, in fp32
    assert 2 * kinds["params"] < kinds["adam"] < 2 * kinds["params"] + 64 * len(list(full.parameters()))
    assert kinds["saved"] > 0
    shares = []
    for layer in range(base.config.num_hidden_layers):
        spec = SplitSpec(layer, 4, "sft")
        split = acc.account_split(base, spec, batch)
        edge, cloud = build_split_model(base, spec, 2, 42)
        for side, half in (("edge", edge), ("cloud", cloud)):
            counted = split[side]
            assert counted["params"] == sum(p.numel() * p.element_size() for p in half.parameters())
            assert counted["grads"] == counted["params"] and counted["saved"] > 0  # charged to its side
        s = acc.split_summary(kinds, split)
        assert 0 < s["moved_share"] < 1 and s["moved_bytes"] == acc.total(split["cloud"])
        wire = split["wire"]
        assert wire["edge_encode"] == wire["edge_decode"] == 2 * 8 * 4 * 4  # the cut's fp32 (2, 8, R=4)
        copies = wire["edge_encode"] + wire["edge_decode"] + wire["message_sent"] + wire["message_received"]
        assert s["edge_bytes"] == acc.total(split["edge"]) + copies
        shares.append(s["moved_share"])
    assert shares == sorted(shares, reverse=True) and len(set(shares)) == len(shares)


@pytest.mark.parametrize("split_layer", [None, 2])
def test_memory_child_reports_its_peaks_and_step_time(split_layer):
    """One measured process, local or the split edge (its cloud in process): the peak while building
    and while training, above the resident size before the model, and the step time. A fresh child
    process, as the benchmark runs it: in this one, memory freed by earlier tests would be reused."""
    from bench.common import run_child

    args = dict(
        model="random:tiny",
        kind="fixed",
        split_layer=split_layer,
        rank=4,
        mode="sft",
        batch_size=2,
        seq=8,
        steps=2,
        warmup=0,
        cloud=None,
    )
    out = run_child("bench.memory", "--child", args)
    assert out["run"] == ("local" if split_layer is None else "edge l=2")
    assert out["built_mib"] > 0 and out["step_s"] > 0
    # The kernel updates RSS counters lazily: the peak may read a few pages below an earlier RSS.
    assert out["idle_mib"] + out["peak_mib"] >= 0.95 * out["idle_mib"] > 0


def _can_make_netns() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    probe = subprocess.run(["ip", "netns", "add", "sftb-probe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "sftb-probe"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_make_netns(), reason="needs root, ip and tc (network namespaces)")
def test_link_namespaces_are_shaped_and_removed():
    from bench import link

    with link.namespaces():
        shown = link.shape(10)
        assert all("tbf" in q and "10Mbit" in q for q in shown.values())
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert link.CLOUD_NS in names and link.EDGE_NS in names
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert link.CLOUD_NS not in names and link.EDGE_NS not in names


@pytest.mark.skipif(not _can_make_netns(), reason="needs root, ip and tc (network namespaces)")
def test_link_namespaces_are_removed_on_sigterm():
    """A SIGTERM inside the block unwinds it: the namespaces go, the status is 128 + SIGTERM."""
    from bench import link

    code = (
        "import os, signal\n"
        "from bench import link\n"
        "with link.namespaces():\n"
        "    print('up', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    signal.pause()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "up" in done.stdout
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert link.CLOUD_NS not in names and link.EDGE_NS not in names


def test_exit_on_signals_restores_the_previous_handlers():
    from bench.common import exit_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, exit_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
@pytest.mark.skipif(not _can_make_netns(), reason="needs root, ip and tc (network namespaces)")
def test_link_benchmark_end_to_end(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.link",
            "--model",
            "random:tiny",
            "--kind",
            "fixed",
            "--batch-size",
            "2",
            "--seq",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--rates",
            "10",
            "--out-dir",
            str(tmp_path),
        ],
        check=True,
        cwd=ROOT,
    )
    rows = json.loads((tmp_path / "link.json").read_text())["rows"]
    assert {r["mode"] for r in rows} == {"local", "sl", "sft"}
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "sftb-" not in names  # the namespaces were removed


@pytest.mark.slow
def test_memory_benchmark_end_to_end(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.memory",
            "--model",
            "random:tiny",
            "--layers",
            "0",
            "--batch-size",
            "2",
            "--seq",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--out-dir",
            str(tmp_path),
        ],
        check=True,
        cwd=ROOT,
    )
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["local", "edge (sft)"]
    assert all(r["train_mib"] > 0 and r["counted_mib"] > 0 for r in rows)


def test_inversion_attacker_reads_back_what_full_width_sl_sends(glue_dir, tmp_path):
    """bench.inversion on a tiny random model, the attacker trained on the very sentences it decodes
    (an upper bound): full-width SL at layer 0 is read back far beyond the most frequent token, so the
    decoder, the alignment of predictions with tokens and the scoring work; and the label rows say
    what the cloud learns of the labels."""
    from bench import inversion

    args = [
        "--model",
        "random:tiny",
        "--layers",
        "0",
        "--ranks",
        "4",
        "--public",
        "sst2:dev",
        "--private",
        "sst2:dev",
        "--sentences",
        "64",
        "64",
        "--epochs",
        "40",
        "--lr",
        "3e-3",
        "--data-dir",
        glue_dir,
        "--out-dir",
        str(tmp_path),
    ]
    assert inversion.main(args) == 0
    result = json.loads((tmp_path / "inversion_random_tiny.json").read_text())
    assert result["public"] == result["private"] == 64
    sl, sft = result["rows"]
    assert (sl["mode"], sl["layer"], sl["width"]) == ("SL", 0, 32)
    assert (sft["mode"], sft["width"]) == ("SFT R=4", 4)
    baseline = result["baseline"]["token_recovery"]
    assert 0 < baseline < 0.1 and result["baseline"]["sentence_recovery"] == 0
    assert sl["tokens"] > 0.6 > 6 * baseline  # measured 0.84
    assert 0 <= sft["tokens"] <= 1 and 0 <= sl["sentences"] <= sl["tokens"]
    two, u = result["labels"]  # 64 examples: two batches of 32
    assert (two["label_ids_sent"], two["labels_recovered"], u["label_ids_sent"]) == (1.0, 1.0, 0.0)
    assert u["labels_recovered"] > 0.9  # measured 1.0: the U's gradient up gives them away


def test_inversion_of_the_ffn_input_cut_at_full_width_reads_back_like_sl(glue_dir, tmp_path):
    """The FFN-input cut at R = hidden sends the residual stream through an invertible A (the SVD's):
    the attacker reads it back as it reads SL. Variant runs have SFT rows only and their own file."""
    from bench import inversion

    args = [
        "--model",
        "random:tiny",
        "--layers",
        "0",
        "--ranks",
        "32",
        "--public",
        "sst2:dev",
        "--private",
        "sst2:dev",
        "--sentences",
        "64",
        "64",
        "--epochs",
        "40",
        "--lr",
        "3e-3",
        "--data-dir",
        glue_dir,
        "--out-dir",
        str(tmp_path),
        "--factorise",
        "ffn-input",
    ]
    assert inversion.main(args) == 0
    result = json.loads((tmp_path / "inversion_random_tiny_ffn-input.json").read_text())
    (row,) = result["rows"]
    assert row["mode"] == "SFT R=32 ffn-input"
    assert row["width"] == 32 and result["labels"] == []
    assert row["tokens"] > 0.6 > 6 * result["baseline"]["token_recovery"]  # as SL's 0.84


def test_inversion_through_the_int4_hadamard_wire_reads_back_like_sl(glue_dir, tmp_path):
    """A full-width cut through int4-hadamard is still the hidden state to 4 bits: the attacker
    decodes the rows the cloud decodes and reads the text back as from fp32 SL (issue 34)."""
    from bench import inversion

    args = ["--model", "random:tiny", "--layers", "0", "--ranks", "--wire", "int4-hadamard"]
    args += ["--public", "sst2:dev", "--private", "sst2:dev", "--sentences", "64", "64", "--epochs", "40"]
    args += ["--lr", "3e-3", "--data-dir", glue_dir, "--out-dir", str(tmp_path)]
    assert inversion.main(args) == 0
    result = json.loads((tmp_path / "inversion_random_tiny_int4-hadamard.json").read_text())
    (sl,) = result["rows"]
    assert (sl["mode"], sl["width"]) == ("SL, int4-hadamard", 32) and not result["labels"]
    assert sl["tokens"] > 0.6 > 6 * result["baseline"]["token_recovery"]  # fp32 SL's test: measured 0.84


def test_decoder_codecs_and_codec_per_cut_run_on_a_tiny_decoder(tmp_path):
    """bench.decoder_codecs and bench.codec_per_cut on a tiny random Llama and the paraphrase set
    (made from ../shared's MRPC): fp32 at full width is the unsplit model, every row is measured."""
    from bench import codec_per_cut, decoder_codecs

    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    common = ["--model", "random:tiny-llama", "--data", data, "--dev-rows", "8", "--out-dir", out]
    result = decoder_codecs.main(
        common
        + [
            "--grad-batches",
            "1",
            "--only",
            "U, full width, fp32",
            "U, full width, int4-6-hadamard (the default)",
        ]
    )
    unsplit, fp32, default = result["step0"]
    assert fp32["dev perplexity"] == pytest.approx(unsplit["dev perplexity"], rel=1e-5)
    assert fp32["bytes a token, activations"] > 2 * default["bytes a token, activations"]
    grads = {r["gradient codec"]: r for r in result["gradients"]}
    assert {"int8 stochastic", "int8 nearest", "int4-hadamard stochastic (-grad4)"} <= set(grads)
    assert (
        grads["int4-hadamard stochastic (-grad4)"]["bytes a token"]
        < grads["int8 stochastic"]["bytes a token"]
    )
    zstd = {(r["wire"], r["compression"]): r["bytes a token"] for r in result["compression"]}
    assert zstd[("int4-hadamard", "zstd")] <= zstd[("int4-hadamard", "none")]
    rows = codec_per_cut.main(common)
    assert rows[0]["vs exact"] == "0.00%" and len(rows) == 1 + len(codec_per_cut.SETTINGS)
    assert all(r["dev perplexity"] > 1 for r in rows)


def test_codec_per_cut_simulates_the_product_codes_and_rounds_3_bits_better_with_8_levels():
    """symmetric(7) decodes as the product's INT4_HADAMARD does (within fp16 scale rounding); the
    mid-rise 3 bits use 8 levels and land nearer Gaussian rows than 7 symmetric levels do."""
    import torch

    from bench.codec_per_cut import midrise, simulated, symmetric, through

    rows = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    product = through("int4-hadamard", rows)
    assert torch.allclose(simulated(rows, symmetric(7)), product, atol=1e-2)
    blocks = torch.randn(10, 2, 64, generator=torch.Generator().manual_seed(1))
    step = (0.9 * blocks.abs().amax(2, keepdim=True) / 3.5).half().float()
    levels = midrise()(blocks) / step
    assert torch.equal(levels.unique(), torch.arange(-3.5, 4.0))  # all 8, no zero
    error = {name: (through(name, rows) - rows).norm() for name in ("int3-midrise", "int3-hadamard")}
    assert error["int3-midrise"] < 0.9 * error["int3-hadamard"], error


def test_gemm_rows_measures_every_product_at_every_row_count(tmp_path):
    from bench import gemm_rows

    result = gemm_rows.main(["--repeats", "1", "--out-dir", str(tmp_path)])
    assert [r["product"].split(" (")[0] for r in result["rows"]] == [name for name, _, _ in gemm_rows.SHAPES]
    assert all(r["8192 / 256"] > 0 for r in result["rows"])
    assert (tmp_path / "gemm_rows.json").exists()


def test_noised_cut_measures_each_noise_against_the_unsplit_model(tmp_path):
    """bench.noised_cut on a tiny random Llama: no noise is the codec's rounding only, a noise that
    drowns the clipped rows moves the perplexity, and epsilon falls as the noise grows."""
    from bench import noised_cut

    data = str(tmp_path / "data")
    args = ["--model", "random:tiny-llama", "--data", data, "--dev-rows", "8", "--tail-layers", "1"]
    result = noised_cut.main(args + ["--noises", "0", "0.1", "1", "--out-dir", str(tmp_path)])
    clean, mild, loud = result["rows"]
    assert clean["epsilon (one release)"] is None and clean["--dp-clip"] is None
    assert mild["epsilon (one release)"] > loud["epsilon (one release)"] > 0
    assert mild["--dp-clip"] == result["norms"]["median"]
    assert loud["dev perplexity, step 0"] != clean["dev perplexity, step 0"]
