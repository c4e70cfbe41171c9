"""What a run's messages gave away: the lookup a report's ``privacy`` takes in the measured attacks.

``privacy_of(setting)`` says, for one finished run (``setting_of``: its resolved config), which
messages crossed the link and, for each message the device sent, the row of
``sft_edge.privacy.measured.MEASURED`` nearest to the run's setting, with what differs; it never
makes a number up. With a defence on (``--dp-noise``, ``--dp-grad-noise``:
``sft_edge.privacy.defence``) ``defence`` says what was noised and ``epsilon`` is one training
example's, from dp-accounting's RDP accountant. A row measured under a defence is quoted only for
a run with that very defence (noise and clip) on that message; any other defended run gets the
undefended row, said to differ in its defence: a weaker noise is never credited with a stronger
one's result.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from sft_edge.privacy.measured import ACTIVATIONS_UP, GRADIENT_UP, LABELS_UP, MEASURED, Measured
from sft_edge.runs.config import DPOptions, TrainConfig

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
    classes: Optional[int] = None  # the task's class count (a label attack's rows depend on it)
    sends_once: bool = False  # each example crosses once in all (forward-only): one release, any epochs


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
        classes=None if run.problem.causal_lm else run.problem.num_labels(run.task),
        sends_once=run.kind.sends_once,
    )


def defence_on(message: str, dp: DPOptions) -> Optional[Tuple[float, float]]:
    """The run's (noise multiplier, clip) on one message it sends; None: that message is not noised."""
    noise, clip = {ACTIVATIONS_UP: (dp.noise, dp.clip)}.get(message, (0.0, 0.0))
    if message.startswith("gradient up"):
        noise, clip = dp.grad_noise, dp.grad_clip
    return (noise, clip) if noise > 0 else None


def _said_defence(defence: Optional[Tuple[float, float]]) -> str:
    return "none" if defence is None else f"noise {defence[0]:g} clip {defence[1]:g}"


def _sent_as(message: str, wire: Optional[str]) -> Optional[str]:
    """The codec ``message`` crosses in under ``--wire-dtype wire``: the first cut's activations go
    in a two-width name's first (int4-6-hadamard and int4-hadamard send the same 4-bit codes up)."""
    found = re.fullmatch(r"int(\d)-\d-hadamard(-grad\d)?", wire or "")
    return f"int{found.group(1)}-hadamard" if found and message == ACTIVATIONS_UP else wire


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
        ("wire_dtype", _sent_as(row.message, row.wire_dtype), _sent_as(row.message, s.wire_dtype)),
    ]
    said = [f"{name}: measured {had}, this run {got}" for name, had, got in pairs if had not in (None, got)]
    if row.classes not in (None, s.classes):
        said.append(f"classes: measured {row.classes}, this run {s.classes}")
    defence = defence_on(row.message, s.dp)
    if row.defence != defence:
        said.append(f"defence: measured {_said_defence(row.defence)}, this run {_said_defence(defence)}")
    return said


def _distance(row: Measured, s: Setting) -> Tuple[Any, ...]:
    """How far a row is from the setting: the cut first, then the kind of model, the model, the
    defence, the width (by ratio), the split layer's place in the model, the tail, the wire, the
    class count."""
    width = abs(math.log2((row.width or s.width) / s.width))
    place = abs(_place(row.split_layer, row.layers) - _place(s.split_layer, s.layers))
    tail = abs((row.tail_layers or 0) - (s.tail_layers or 0))
    wire = _sent_as(row.message, row.wire_dtype) not in (None, _sent_as(row.message, s.wire_dtype))
    classes = abs((row.classes or 0) - (s.classes or 0)) if row.classes and s.classes else 0
    return (
        row.cut not in (None, s.cut),
        row.decoder != s.decoder,
        row.model != s.model,
        row.defence != defence_on(row.message, s.dp),
        width,
        place,
        tail,
        wire,
        classes,
    )


def nearest(message: str, s: Setting) -> Optional[Measured]:
    """The measured row of ``message`` nearest to the setting, or None when it was never attacked.
    A row measured under a defence is a candidate only for a run with that same defence on it."""
    defence = defence_on(message, s.dp)
    rows = [r for r in MEASURED if r.message == message and r.defence in (None, defence)]
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
    other_wire = _sent_as(message, row.wire_dtype) not in (None, _sent_as(message, s.wire_dtype))
    wire = [WIRE_NOTES[s.cut]] if s.cut in WIRE_NOTES and other_wire else []
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
    messages (the nearest measured rows, with their sources), and the defence with its epsilon."""
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
    # one release an example: forward-only sends each once, or one every time its batch is sent
    steps, rate = (1, 1.0) if s.sends_once else (s.steps, s.sampling_rate)
    out["releases"] = defence.releases(steps, rate)
    try:
        out["epsilon"] = defence.epsilon(steps, rate, gradient=gradient)
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
    return f"{said}; noise on {', '.join(noised)}: epsilon {eps}"


def _said(finding: Dict[str, Any]) -> str:
    row = finding["measured"]
    said = f"{finding['message']}: {100 * row['recovered']:.1f} % of {row['of']}"
    said += "" if row["defence"] is None else f", through {_said_defence(row['defence'])}"
    if not finding["differs"]:
        return said
    return f"{said} (nearest measured: {row['model']}, differs in {', '.join(d.split(':')[0] for d in finding['differs'])})"
