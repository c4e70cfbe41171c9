"""GLUE data on the edge: the TSV layouts, label sets, dynamic padding, reproducible order."""

from __future__ import annotations

import os

import pytest

from sft_edge.data.glue import DataError, batch_indices, collate, encode, load_examples, steps_per_epoch
from sft_edge.data.tasks import TASKS, get_task


@pytest.mark.parametrize(
    "task, n_train, n_dev, segments, labels",
    [("sst2", 67349, 872, 1, {0, 1}), ("mrpc", 3667, 408, 2, {0, 1}), ("rte", 2490, 277, 2, {0, 1})],
)
def test_shared_glue_files(glue_dir, task, n_train, n_dev, segments, labels):
    # MRPC: the file holds 3,667 pairs under its header (the data README says 3,668).
    t = get_task(task)
    train = load_examples(t, "train", glue_dir)
    dev = load_examples(t, "dev", glue_dir)
    assert (len(train), len(dev)) == (n_train, n_dev)
    assert all(len(e.texts) == segments for e in train[:50])
    assert {e.label for e in dev} == labels


def test_mrpc_bom_header_and_rte_label_names(glue_dir):
    first = load_examples(get_task("mrpc"), "train", glue_dir, limit=1)[0]
    assert first.label == 1 and first.texts[0].startswith("Amrozi accused his brother")
    rte = load_examples(get_task("rte"), "train", glue_dir, limit=2)
    assert [e.label for e in rte] == [1, 0]  # not_entailment, entailment


def test_every_task_is_registered_with_its_metric():
    assert set(TASKS) == {"sst2", "mrpc", "rte", "cola", "stsb", "qnli", "qqp", "mnli", "wnli"}
    assert get_task("cola").metrics == ("matthews_correlation",)
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("mnli").num_labels == 3 and get_task("mnli").dev_file == "dev_matched.tsv"
    with pytest.raises(ValueError, match="unknown task 'sst3'"):
        get_task("sst3")


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_headerless_cola_and_regression_stsb(tmp_path):
    _write(
        tmp_path / "CoLA" / "train.tsv",
        "gj04\t1\t\tThe sailors rode the breeze .\nclc95\t0\t*\tThe more we study .\n",
    )
    cola = load_examples(get_task("cola"), "train", str(tmp_path))
    assert [(e.texts, e.label) for e in cola] == [
        (("The sailors rode the breeze .",), 1),
        (("The more we study .",), 0),
    ]
    _write(
        tmp_path / "STS-B" / "dev.tsv",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain\tx\t2012\t1\tnone\tnone\tA man plays.\tA man is playing.\t4.6\n",
    )
    stsb = load_examples(get_task("stsb"), "dev", str(tmp_path))
    assert stsb[0].label == pytest.approx(4.6) and stsb[0].texts == ("A man plays.", "A man is playing.")


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="SST-2/train.tsv does not exist"):
        load_examples(get_task("sst2"), "train", str(tmp_path))
    _write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\ngood film\t7\n")
    with pytest.raises(DataError, match="train.tsv:2: label '7' is not one of"):
        load_examples(get_task("sst2"), "train", str(tmp_path))
    _write(tmp_path / "RTE" / "train.tsv", "idx\ttext\nx\ty\n")
    with pytest.raises(DataError, match="lacks the columns"):
        load_examples(get_task("rte"), "train", str(tmp_path))


def test_offline_without_data_dir_says_so(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="pass --data-dir|pip install datasets"):
        load_examples(get_task("sst2"), "train", None)


def test_dynamic_padding_and_pairs(glue_dir, minilm_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_base.tokenizer_dir)
    data = encode(load_examples(get_task("rte"), "dev", glue_dir, limit=8), tok, max_seq_len=64)
    batch = collate(data, [0, 1, 2])
    assert batch.input_ids.shape == (3, max(batch.lengths)) and max(batch.lengths) <= 64
    assert batch.attention_mask.sum(1).tolist() == batch.lengths
    assert batch.token_type_ids.max() == 1  # the second segment is marked
    assert (batch.input_ids * (1 - batch.attention_mask)).sum() == 0  # padded with [PAD] = 0


def test_batch_order_is_a_function_of_seed_and_step():
    n, b = 103, 10
    assert steps_per_epoch(n, b) == 11
    epoch0 = [i for s in range(11) for i in batch_indices(n, b, seed=3, step=s)]
    assert sorted(epoch0) == list(range(n))  # every example once per epoch, last batch short
    assert batch_indices(n, b, 3, 11) != batch_indices(n, b, 3, 0)  # a new order each epoch
    assert batch_indices(n, b, 3, 12) == batch_indices(n, b, 3, 12)
    assert batch_indices(n, b, 4, 0) != batch_indices(n, b, 3, 0)
