"""After training: `sft-edge predict`, `export` and `forget`.

A split run's ``--output-dir`` holds net1; net2 stays with the daemon that trained it (under its
``--checkpoint-dir``). ``predict`` reopens that finished session for inference only; ``export``
fetches net2 (a U-shaped run's middle; in chunks, checked by a digest) and writes a folder that
predicts (or generates) with no daemon (``sft_edge.finished.trained.load_trained``, ``sft_edge.finished.generate``);
``forget`` has the daemon delete what it keeps. Inputs are
the training file formats or ``.txt`` (one example a line; a sentence pair separated by a tab);
outputs ``.csv`` or ``.jsonl``, one row per example with its ``prediction`` and probabilities.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from typing import Dict, List, Tuple

from sft_common.proto import sft_pb2 as pb
from sft_common.storage.atomic import replaced
from sft_edge.data.glue import DataError
from sft_edge.finished.parts import open_finished, open_model
from sft_edge.finished.record import EDGE, read_run
from sft_edge.finished.trained import TrainedModel
from sft_edge.runs.config import Connection, ExportConfig, PredictConfig
from sft_edge.runs.kinds import exported_part, kind_of_record

OUTPUTS = (".csv", ".jsonl")


def predict(cfg: PredictConfig) -> int:
    """Write one prediction per input example to ``cfg.output``; returns how many."""
    from transformers import AutoTokenizer

    from sft_common.training import resolve_device

    ext = os.path.splitext(cfg.output)[1].lower()
    if ext not in OUTPUTS:
        raise DataError(f"{cfg.output}: write predictions to a .csv or .jsonl file")
    record = read_run(cfg.run)
    if record.causal_lm:
        raise DataError(
            f"{cfg.run} is a causal-LM run: it generates text (sft-edge generate), it does not classify"
        )
    texts = read_inputs(cfg.input, record.text_columns)
    device = resolve_device(cfg.device)
    opened = open_model(cfg.run, record, device, cfg.connection)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.run)
        model = TrainedModel(record, tokenizer, opened.logits, opened.module, device)
        rows = model.predict(texts, batch_size=min(cfg.batch_size, opened.max_batch or cfg.batch_size))
    finally:
        opened.close()
    write_predictions(cfg.output, texts, record.text_columns, rows, record.labels)
    return len(rows)


def export(cfg: ExportConfig) -> str:
    """``cfg.to``: both halves (a U-shaped run: the edge's head and tail, and the daemon's
    middle), the config, the tokenizer and the label names of a split run.

    The factorised cuts stay factorised (u, Σ, v as trained): the split model has no residual
    around them, so multiplying the factors back into a dense linear would not make the folder a
    stock Hugging Face model; ``load_trained`` and ``sft-edge generate`` build it from the run's
    own modules instead."""
    record = read_run(cfg.run)
    if record.part != EDGE:
        raise DataError(f"{cfg.run} is not a split run's --output-dir (it holds {record.part!r} weights)")
    if os.path.exists(cfg.to) and os.listdir(cfg.to):
        raise DataError(f"{cfg.to} exists and is not empty: export into a new folder")
    files = kind_of_record(record).exported_files(cfg.run, record, cfg.connection)
    tmp = cfg.to.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    leave = shutil.ignore_patterns("checkpoints", "activation_cache", "*.csv", "*.png", "route-key")
    shutil.copytree(cfg.run, tmp, ignore=leave)
    for name, data in files.items():  # the daemon's part (and a forward-only run's edge part, whole)
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    record.part = exported_part(record)  # cloud.safetensors: the U's middle, or net2
    record.weights = ["edge.safetensors", "cloud.safetensors"]
    record.write(tmp)
    if os.path.isdir(cfg.to):
        os.rmdir(cfg.to)
    os.replace(tmp, cfg.to)  # the folder appears whole or not at all
    return cfg.to


def forget(run: str, connection: Connection) -> str:
    """Have the daemon delete the finished session of ``run``; returns its id."""
    record = read_run(run)
    if record.part != EDGE:
        raise DataError(f"{run} is not a split run's --output-dir: the daemon keeps nothing of it")
    session = open_finished(run, record, connection, "cpu")
    session.request(pb.EdgeMessage(forget=pb.Forget()))  # the daemon deletes it; the stream ends
    session.transport.close()
    return str(record.session_id)


def fetch_weights(session) -> bytes:
    """net2's trained weights (a safetensors file) from a finished session reopened for
    inference, fetched in chunks and checked against the digest the cloud sends."""
    import hashlib

    import grpc

    from sft_edge.link.transport import CloudError

    parts, chunks, index, reply = [], 1, 0, pb.WeightsChunk()
    while index < chunks:
        reply = session.request(pb.EdgeMessage(fetch=pb.FetchWeights(chunk=index))).weights
        if reply.chunk != index:
            raise CloudError(grpc.StatusCode.INTERNAL, f"asked for chunk {index}, got chunk {reply.chunk}")
        parts.append(reply.data)
        chunks, index = reply.chunks, index + 1
    data = b"".join(parts)
    if len(data) != reply.size or hashlib.sha256(data).hexdigest() != reply.sha256:
        raise CloudError(
            grpc.StatusCode.DATA_LOSS, "the weights fetched do not match the digest the cloud sent"
        )
    return data


def read_inputs(path: str, columns: List[str]) -> List[Tuple[str, ...]]:
    """The examples of an input file: its text columns, or the lines of a ``.txt`` file."""
    if path.lower().endswith(".txt"):
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        texts = [tuple(line.split("\t")) for line in lines]
        for n, t in enumerate(texts, start=1):
            if len(t) != len(columns):
                raise DataError(f"{path}:{n}: {len(t)} tab-separated texts; this model reads {len(columns)}")
        return texts
    from sft_edge.data.files import read_rows

    return [tuple(str(row[c]) for c in columns) for row, _ in read_rows(path, columns)]


def write_predictions(path: str, texts, columns: List[str], rows: List[Dict], labels) -> None:
    """CSV: the text columns, ``prediction`` and ``probability_<label>`` each; JSON Lines: the
    text columns, ``prediction`` and ``probabilities`` ({label: p})."""
    with replaced(path, newline="") as f:
        if path.lower().endswith(".jsonl"):
            for text, row in zip(texts, rows):
                f.write(json.dumps({**dict(zip(columns, text)), **row}, ensure_ascii=False) + "\n")
        else:
            probs = [f"probability_{name}" for name in labels or []]
            writer = csv.writer(f)
            writer.writerow([*columns, "prediction", *probs])
            for text, row in zip(texts, rows):
                p = row.get("probabilities", {})
                writer.writerow([*text, row["prediction"], *(p[name] for name in labels or [])])
