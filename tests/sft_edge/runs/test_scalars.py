"""The edge's scalars CSV (append-safe across resumes) and `sft-edge plot` drawing it to PNG."""

from __future__ import annotations

import csv

import pytest

from sft_edge.cli import main as edge_main
from sft_edge.runs import scalars


def test_scalars_path_rules(tmp_path):
    assert scalars.scalars_path(str(tmp_path), "r.json") == str(tmp_path / "scalars.csv")
    assert scalars.scalars_path(None, "out/run.json") == "out/run.scalars.csv"
    assert scalars.scalars_path(None, None) is None


def _write_run(path, steps=6):
    log = scalars.ScalarLog(str(path))
    for k in range(1, steps + 1):
        log.train(k, loss=1.0 / k, lr=2e-5 * (1 - k / steps), bytes_sent=1000 * k, bytes_received=800 * k)
        if k % 3 == 0:
            log.eval(k, {"step": k, "epoch": k / 3, "accuracy": 0.5 + k / 100})
    log.close()


def test_rows_round_trip_and_a_resume_appends(tmp_path):
    path = tmp_path / "scalars.csv"
    _write_run(path)
    # A resumed run re-does step 6 with another loss: one header, the last row wins.
    log = scalars.ScalarLog(str(path))
    log.train(6, loss=0.25, lr=0.0, bytes_sent=6000, bytes_received=4800)
    log.close()
    rows = list(csv.reader(open(path)))
    assert rows[0] == scalars.HEADER and sum(r == scalars.HEADER for r in rows) == 1
    series = scalars.read(str(path))
    assert [s for s, _ in series["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert series["train/loss"][-1] == (6, 0.25)
    assert series["eval/accuracy"] == [(3, pytest.approx(0.53)), (6, pytest.approx(0.56))]
    assert "eval/step" not in series and "eval/epoch" not in series
    assert series["traffic/bytes_sent"][2] == (3, 3000.0)


def test_plot_command_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _write_run(tmp_path / "scalars.csv")
    out = tmp_path / "curves.png"
    assert edge_main(["plot", str(tmp_path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_refuses_a_file_without_losses(tmp_path, capsys):
    bad = tmp_path / "other.csv"
    bad.write_text("wall_time,step,tag,value\n1,1,eval/accuracy,0.5\n")
    assert edge_main(["plot", str(bad)]) == 2
    assert "no train/loss rows" in capsys.readouterr().err


def test_a_split_run_writes_its_scalars_beside_the_weights(live_server, glue_dir, tmp_path):
    from sft_edge.runs.trainer import TrainConfig, train

    address, _ = live_server
    out = tmp_path / "run"
    cfg = TrainConfig(
        task="sst2", cloud=address, insecure=True, model="random:tiny", data_dir=glue_dir, max_steps=4,
        batch_size=8, max_train_examples=16, max_eval_examples=16, split_layer=1, output_dir=str(out),
        progress=False,
    )  # fmt: skip
    report = train(cfg)
    series = scalars.read(str(out / "scalars.csv"))
    assert [s for s, _ in series["train/loss"]] == [1, 2, 3, 4]
    losses = [v for _, v in series["train/loss"]]
    assert losses[0] == pytest.approx(report["train_loss_first"])
    assert losses[-1] == pytest.approx(report["train_loss_last"])
    assert series["train/lr"][0][1] == pytest.approx(cfg.lr)
    # 16 examples / batch 8: an evaluation after steps 2 and 4, the last one the report's.
    assert [s for s, _ in series["eval/accuracy"]] == [2, 4]
    assert series["eval/accuracy"][-1][1] == pytest.approx(report["metrics"]["accuracy"])
    sent = [v for _, v in series["traffic/bytes_sent"]]
    assert sent == sorted(sent) and 0 < sent[-1] <= report["bytes_sent"]
