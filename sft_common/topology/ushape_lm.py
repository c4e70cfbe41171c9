"""The U-shape for a causal language model: the edge's tail ends in the model's LM head.

The cloud's middle is the classification U's, unchanged (``sft_common.topology.ushape``); only the edge's
last part differs. ``LMTail`` is the two-part ``CloudHalf`` at the second cut (Σ2, v2, the last
``tail_layers`` layers, the final norm) with the LM head on every position instead of a pooled
classification head: logits (batch, seq, vocab). The LM head is the model's ``lm_head``:

- tied to the input embeddings (``config.tie_word_embeddings``: GPT-2, SmolLM2): the tail uses
  the head part's embedding matrix itself (``TiedLMHead``, which holds no parameter of its own),
  so the edge trains one tensor, saved once, exactly as the unsplit causal LM does;
- untied: its own ``lm_head.weight`` from the checkpoint, or, where a checkpoint lacks one (the
  ``random:`` presets, which hold a backbone only), drawn from the run's seed.

With LoRA the LM head stays frozen (PEFT's default for a causal LM; tied, it is the embeddings).
Only decoders (GPT-2, Llama, Qwen2) have an LM head here: encoders are refused by name.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from sft_common.models.base_model import BaseModel
from sft_common.models.families import fill_buffers
from sft_common.models.loading import materialise, model_skeleton
from sft_common.topology.spec import SplitSpec
from sft_common.topology.two_part import CloudHalf, build_full_model, factorise
from sft_common.topology.ushape import (
    CloudMiddle,
    EdgeFactors,
    EdgeHead,
    EdgeTail,
    UShapeSpec,
    build_edge_head,
    validate_ushape,
)

LM_HEAD = "lm_head.weight"  # the untied LM head's name in a causal-LM checkpoint (every family here)


def check_causal_lm(base: BaseModel) -> None:
    """ValueError naming the family when ``base`` is not a decoder with an LM head."""
    family = base.family
    if not family.decoder:
        raise ValueError(
            f"--problem causal-lm needs a decoder (GPT-2, Llama, Qwen2): {base.name!r} is {family.name}, "
            "an encoder, which has no language-model head and sees every token at once"
        )


class TiedLMHead(nn.Module):
    """The LM head tied to the input embeddings: ``logits = h · Eᵀ`` with E the embedding
    matrix (vocab, hidden) of the edge's head part. It registers no parameter (E is the head
    part's), so a state dict and an optimizer hold E once."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = (embedding,)  # a tuple: not registered as a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class LMTail(CloudHalf):
    """The causal LM's edge tail: (Σ2, v2, dropout), layers l2+1..L-1, the final norm, the LM
    head on every position. Output: logits (batch, seq, vocab)."""

    lm_head: nn.Module
    norm: nn.Module  # the final norm (every decoder has one: Family.final)

    def __init__(self, model: nn.Module, spec: SplitSpec, lm_head: nn.Module):
        super().__init__(model, spec)
        for name in self.head_names:  # the classification head (a decoder's score) is not used
            delattr(self, name)
        self.head_names = ()  # nothing besides the factors is kept trainable under LoRA
        self.lm_head: nn.Module = lm_head

    def forward(
        self, cut: torch.Tensor, attention_mask: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self.lm_head(self.norm(self.hidden(cut, attention_mask, residual)))


def input_embedding(head: nn.Module, vocab: int) -> nn.Embedding:
    """The token embedding among ``head``'s modules (Llama's embed_tokens, GPT-2's wte)."""
    for module in head.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
            return module
    raise ValueError(f"no token embedding of {vocab} rows in the edge's head part")


def lm_head_for(base: BaseModel, head: nn.Module, seed: int, device: str = "cpu") -> nn.Module:
    """The model's LM head: tied to the token embedding in ``head`` (the U's head part, or the
    whole model), or its own (checkpoint or seed)."""
    config = base.config
    embedding = input_embedding(head, int(config.vocab_size))
    if getattr(config, "tie_word_embeddings", False):
        return TiedLMHead(embedding)
    linear = nn.Linear(base.hidden_size, int(config.vocab_size), bias=False, device="meta")
    linear.to_empty(device=device)
    value = base.load([LM_HEAD]).get(LM_HEAD)
    with torch.no_grad():
        if value is None:  # a backbone-only checkpoint: drawn from the seed alone, like a task head
            g = torch.Generator().manual_seed(seed)
            value = torch.empty(linear.weight.shape).normal_(0.0, config.initializer_range, generator=g)
        assert value.shape == linear.weight.shape, (
            f"{LM_HEAD}: checkpoint {tuple(value.shape)} vs model {tuple(linear.weight.shape)}"
        )
        linear.weight.copy_(value)
    return linear


def build_ushape_lm_model(
    base: BaseModel, spec: UShapeSpec, seed: int, device: str = "cpu"
) -> Tuple[EdgeHead, CloudMiddle, LMTail]:
    """The three parts of one factorised causal LM in one process (the reference)."""
    check_causal_lm(base)
    first, second = validate_ushape(base, spec)
    model = factorise(factorise(build_full_model(base, 2, seed, device), first), second)
    head = EdgeHead(model, first)
    return head, CloudMiddle(model, spec), LMTail(model, second, lm_head_for(base, head, seed, device))


def build_ushape_lm_edge(
    base: BaseModel, spec: UShapeSpec, seed: int, factors: Optional[EdgeFactors], device: str = "cpu"
) -> Tuple[EdgeHead, LMTail]:
    """The edge's head and LM tail, loading only their own weights (``build_ushape_edge``'s,
    with the LM head for the classification head); ``factors`` from the cloud (None for SL)."""
    check_causal_lm(base)
    first, second = validate_ushape(base, spec)
    model = model_skeleton(base, num_labels=2)  # its score is never materialised here
    head = build_edge_head(base, first, second, model, factors, device)
    tail = LMTail(model, second, lm_head_for(base, head, seed, device))
    materialise(tail, base, model, seed, device, skip=("tail", "lm_head"))
    return head, tail


def build_causal_lm(base: BaseModel, seed: int, device: str = "cpu") -> nn.Module:
    """The whole unsplit causal LM (``--local --problem causal-lm``): Hugging Face's
    ``*ForCausalLM`` with the base's weights and the LM head the U's tail gets (``lm_head_for``:
    tied, so one tensor as in the U, the checkpoint's, or drawn from ``seed``). Its ``logits``
    are (batch, seq, vocab)."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(base)
    config = base.config.__class__.from_dict(base.config.to_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    materialise(model, base, model, seed, device, skip=("lm_head",))
    model.lm_head = lm_head_for(base, model, seed, device)
    return model


def trained_causal_lm(config, device: str = "cpu") -> nn.Module:
    """``build_causal_lm``'s model with uninitialised storage, to load a ``--local`` run's
    trained weights into (no base model needed)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device=device)
    fill_buffers(model)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head = TiedLMHead(input_embedding(model, int(config.vocab_size)))
    return model


def trained_ushape(
    config, spec: UShapeSpec, num_labels: int, device: str = "cpu"
) -> Tuple[EdgeHead, CloudMiddle, nn.Module]:
    """The U's three parts with uninitialised storage, to load a run's trained weights into (an
    export: no base model needed): the tail ends in the LM head for ``num_labels`` 0 (a causal
    LM; tied where the config ties it), else in the task head (``EdgeTail``)."""
    base = BaseModel(name="trained", config=config, fingerprint="", tokenizer_dir="")
    model = model_skeleton(base, max(num_labels, 1))
    first, second = spec.cuts(base.num_hidden_layers)
    for cut in (first, second):  # each cut's modules (none for SL), all on meta until to_empty
        cut.cut.skeleton(base.family, base.family.layers(model)[cut.split_layer], base.hidden_size)
    model.to_empty(device=device)
    fill_buffers(model)  # buffers that no state dict carries
    head = EdgeHead(model, first)
    if num_labels:
        return head, CloudMiddle(model, spec), EdgeTail(model, second)
    lm_head: nn.Module
    if getattr(config, "tie_word_embeddings", False):
        lm_head = TiedLMHead(input_embedding(head, int(config.vocab_size)))
    else:  # loaded from the run's weights (or, under LoRA, the base's)
        lm_head = nn.Linear(base.hidden_size, int(config.vocab_size), bias=False, device="meta")
        lm_head.to_empty(device=device)
    return head, CloudMiddle(model, spec), LMTail(model, second, lm_head)
