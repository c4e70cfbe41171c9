"""A model to use once training ends: ``load_trained(DIR)`` and its ``predict(texts)``.

``DIR`` is a folder ``sft-edge export`` wrote (both halves of a split run; the three parts of a
U-shaped one; those three and the side network of a ``--forward-only --adapters parallel`` run)
or the ``--output-dir`` of a ``--local`` run (the whole model): each holds ``sft_edge.json``
(what was trained, the label names), ``config.json``, the tokenizer and safetensors weights, and
predicts with no daemon (a causal LM's generates: ``sft_edge.finished.generate``). A split run's
own ``--output-dir`` holds only net1: it predicts through the daemon that keeps net2
(``sft_edge.finished.predict``).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from sft_edge.data.glue import DataError, Example, collate, encode
from sft_edge.finished.parts import open_model
from sft_edge.finished.record import RUN_FILE, RunRecord, read_run

__all__ = ["RUN_FILE", "TrainedModel", "load_trained", "read_run"]
Text = Union[str, Sequence[str]]  # one text, or a sentence pair


class TrainedModel(nn.Module):
    """Texts in, predictions out: the label name (or the value, for regression) and each
    class's probability. ``logits`` maps a batch to (batch, num_labels)."""

    def __init__(
        self,
        record: RunRecord,
        tokenizer,
        logits: Callable,
        module: Optional[nn.Module] = None,
        device: str = "cpu",
    ):
        super().__init__()
        self.record, self.tokenizer, self.logits, self.device = record, tokenizer, logits, device
        self.model = module  # registered, so .to() and .parameters() reach the weights
        self.labels: Optional[List[str]] = record.labels
        self.columns: List[str] = list(record.text_columns or ["text"])

    @torch.no_grad()
    def predict(self, texts: Sequence[Text], batch_size: int = 32) -> List[Dict]:
        """One ``{"prediction": ..., "probabilities": {label: p}}`` per text (or text pair)."""
        examples = [Example((t,) if isinstance(t, str) else tuple(t), 0) for t in texts]
        if not examples:
            return []
        data = encode(examples, self.tokenizer, self.record.max_seq_len)
        out: List[Dict] = []
        for k, start in enumerate(range(0, len(data), batch_size)):
            idx = list(range(start, min(start + batch_size, len(data))))
            logits = self.logits(collate(data, idx).to(self.device), k).float().cpu()
            out.extend(self._rows(logits))
        return out

    def _rows(self, logits: torch.Tensor) -> List[Dict]:
        if self.labels is None:
            return [{"prediction": float(v)} for v in logits[:, 0]]
        probs = torch.softmax(logits, dim=-1)
        return [
            {
                "prediction": self.labels[int(p.argmax())],
                "probabilities": {name: float(p[i]) for i, name in enumerate(self.labels)},
            }
            for p in probs
        ]


def load_trained(folder: str, device: str = "cpu") -> TrainedModel:
    """The model in ``folder`` (an export, or a ``--local`` run), ready to ``predict``."""
    from transformers import AutoTokenizer

    record = read_run(folder)
    if record.causal_lm:
        raise DataError(f"{folder} holds a causal LM: it generates text (sft-edge generate --run DIR)")
    opened = open_model(folder, record, device)  # no connection: a split run's edge half is refused
    return TrainedModel(record, AutoTokenizer.from_pretrained(folder), opened.logits, opened.module, device)
