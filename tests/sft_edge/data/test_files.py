"""The device's own files: formats, label inference, held-out dev share, and clear refusals."""

from __future__ import annotations

import json
import os

import pytest

from sft_edge.data.files import FileSpec, load_file_task
from sft_edge.data.glue import DataError
from sft_edge.runs.trainer import TrainConfig, train

ROWS = [
    ("a fine film", "pos"),
    ("dull and slow", "neg"),
    ("lovely", "pos"),
    ("awful", "neg"),
    ("great", "pos"),
]


def _csv(path, rows=ROWS, header="text,label"):
    path.write_text(header + "\n" + "".join(f'"{t}",{y}\n' for t, y in rows), encoding="utf-8")
    return str(path)


def _spec(train, dev=None, **kw):
    values = dict(text_columns=("text",), label_column="label")
    values.update(kw)
    return FileSpec(train, dev, **values)


def test_string_labels_are_sorted_classes_and_a_seeded_share_is_held_out(tmp_path):
    task, train, dev = load_file_task(_spec(_csv(tmp_path / "t.csv"), dev_share=0.4))
    assert task.labels == ("neg", "pos") and task.metrics == ("accuracy", "macro_f1")
    assert len(train) == 3 and len(dev) == 2
    assert sorted(e.texts[0] for e in train + dev) == sorted(t for t, _ in ROWS)
    again = load_file_task(_spec(_csv(tmp_path / "t.csv"), dev_share=0.4))[2]
    assert [e.texts for e in again] == [e.texts for e in dev]  # the same rows, run after run


@pytest.mark.parametrize("ext", [".jsonl", ".parquet", ".tsv"])
def test_every_format_reads_alike(tmp_path, ext):
    import pandas as pd

    frame = pd.DataFrame(
        {"s1": ["x y", "z", "w v", "q"], "s2": ["a", "b", "c", "d"], "score": [0.5, 1.5, 2.0, 3.25]}
    )
    path = str(tmp_path / f"data{ext}")
    if ext == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif ext == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t", index=False)
    task, train, dev = load_file_task(_spec(path, path, text_columns=("s1", "s2"), label_column="score"))
    assert task.labels is None and task.metrics == ("pearson", "spearmanr", "mse")  # floats: regression
    assert [e.texts for e in train] == [("x y", "a"), ("z", "b"), ("w v", "c"), ("q", "d")]
    assert [e.label for e in train] == [0.5, 1.5, 2.0, 3.25]


def test_integer_labels_are_classes_unless_regression_is_asked_for(tmp_path):
    path = _csv(tmp_path / "t.csv", [("a", 2), ("b", 10), ("c", 2)])
    task, train, _ = load_file_task(_spec(path, path))
    assert task.labels == ("2", "10") and [e.label for e in train] == [0, 1, 0]  # numeric order
    task, train, _ = load_file_task(_spec(path, path, problem="regression"))
    assert task.labels is None and [e.label for e in train] == [2.0, 10.0, 2.0]


def _bad_files(tmp_path):
    """name -> (spec, the words the error must hold)"""
    good = _csv(tmp_path / "good.csv")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "short.csv").write_text('text,label\n"fine",pos\n"no label here"\n"ok",neg\n')
    (tmp_path / "latin1.csv").write_bytes("text,label\nfine,pos\ncaf\xe9,neg\n".encode("latin-1"))
    unseen = _csv(tmp_path / "dev.csv", [("x", "pos"), ("y", "meh")])
    one = _csv(tmp_path / "one.csv", [("x", "pos"), ("y", "pos"), ("z", "pos")])
    return {
        "missing column": (
            _spec(good, label_column="sentiment"),
            ["good.csv", "'sentiment'", "'text', 'label'"],
        ),
        "empty file": (_spec(str(tmp_path / "empty.csv")), ["empty.csv", "empty"]),
        "too few fields": (_spec(str(tmp_path / "short.csv")), ["short.csv:3", "1 fields", "header has 2"]),
        "not UTF-8": (_spec(str(tmp_path / "latin1.csv")), ["latin1.csv:3", "not UTF-8", "column 4"]),
        "unseen dev label": (
            _spec(good, unseen),
            ["dev.csv:3", "'meh'", "does not occur in the training file"],
        ),
        "one class": (_spec(one), ["one.csv", "one class only", "'pos'"]),
        "no such file": (_spec(str(tmp_path / "nope.csv")), ["nope.csv", "no such file"]),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing column",
        "empty file",
        "too few fields",
        "not UTF-8",
        "unseen dev label",
        "one class",
        "no such file",
    ],
)
def test_bad_input_is_refused_naming_file_line_and_column(tmp_path, case):
    spec, words = _bad_files(tmp_path)[case]
    with pytest.raises(DataError) as caught:
        load_file_task(spec)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_bad_input_opens_no_session_and_writes_nothing(tmp_path, live_server):
    address, registry = live_server
    spec, _ = _bad_files(tmp_path)["unseen dev label"]
    out = tmp_path / "run"
    cfg = TrainConfig(
        train_file=spec.train_file, dev_file=spec.dev_file, text_columns="text", label_column="label",
        cloud=address, insecure=True, model="random:tiny", output_dir=str(out), report=str(out / "r.json"),
        progress=False, checkpoint_every=1,
    )  # fmt: skip
    with pytest.raises(DataError, match="does not occur"):
        train(cfg)
    assert not out.exists() and len(registry) == 0


def test_a_jsonl_regression_file_trains_through_a_real_daemon(tmp_path, live_server):
    address, registry = live_server
    path = tmp_path / "scores.jsonl"
    with open(path, "w") as f:
        for k in range(24):
            f.write(json.dumps({"review": f"item {k} " + "good " * (k % 4), "stars": 1.0 + (k % 4)}) + "\n")
    out = tmp_path / "run"
    report = train(
        TrainConfig(
            train_file=str(path),
            text_columns="review",
            label_column="stars",
            cloud=address,
            insecure=True,
            model="random:tiny",
            batch_size=4,
            max_steps=4,
            lr=1e-3,
            output_dir=str(out),
            progress=False,
        )  # fmt: skip
    )
    assert report["task"] == "custom" and report["labels"] is None and report["cloud_steps"] == 4
    assert set(report["metrics"]) == {"pearson", "spearmanr", "mse"} and report["dev_examples"] == 2
    assert os.path.isfile(out / "edge.safetensors")
