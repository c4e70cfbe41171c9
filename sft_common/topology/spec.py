"""The split configuration both halves agree on, and the fingerprint that proves they do."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:
    from sft_common.cuts import Cut

# The cut's settings by name. Here, with no torch import, so that the command lines check their
# flags before anything heavy loads; ``sft_common.cuts`` maps them to the Cut classes.
MODES = ("sft", "sl")  # --mode: "sft" factorises the cut, "sl" sends the hidden states
FFN_OUTPUT, FFN_INPUT = "ffn-output", "ffn-input"
FACTORISATIONS = (FFN_OUTPUT, FFN_INPUT)  # --factorise: the FFN linear an SFT cut factorises

__all__ = ["FACTORISATIONS", "FFN_INPUT", "FFN_OUTPUT", "MODES", "SplitSpec", "session_fingerprint"]


@dataclass(frozen=True)
class SplitSpec:
    """Where and how a model is cut between the edge and the cloud."""

    split_layer: int  # 0-based index of the layer whose FFN output is cut
    rank: int = 8  # SFT rank R of the factorised FFN output (ignored for "sl")
    mode: str = "sft"  # "sft": rank-R activations cross the link; "sl": full hidden states
    keep_residual: bool = False  # in-process only: keep layer l's residual (exactness tests)
    factorise: str = FFN_OUTPUT  # SFT: the cut layer's FFN output linear is factorised, or its input

    def validate(self, num_layers: int, hidden: int, intermediate: int) -> None:
        """Raise ValueError with a user-facing message when the spec does not fit the model."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.split_layer < num_layers:
            raise ValueError(
                f"split layer {self.split_layer} is out of range: the model has {num_layers} layers "
                f"(valid: 0..{num_layers - 1})"
            )
        if self.factorise not in FACTORISATIONS:
            raise ValueError(f"factorise must be one of {', '.join(FACTORISATIONS)}, got {self.factorise!r}")
        if self.factorise == FFN_INPUT and self.mode != "sft":
            raise ValueError(
                "--factorise ffn-input needs --mode sft: plain split learning sends the hidden states "
                "and factorises nothing"
            )
        self.cut.validate(hidden, intermediate)

    @property
    def cut(self) -> Cut:
        """What happens at the cut layer (``sft_common.cuts``), resolved from mode and factorise."""
        from sft_common.cuts import cut_of  # torch: only when a model is built

        return cut_of(self)

    def cut_width(self, hidden: int) -> int:
        """Width of one token's activation at the cut: R for SFT, hidden for plain SL."""
        return self.cut.width(hidden)

    def edge_factor_shape(self, hidden: int, intermediate: int) -> Tuple[int, int]:
        """The factor the cloud sends the edge (SFT): u (intermediate, R) for the FFN-output cut,
        Aᵀ (hidden, R) for the FFN-input cut. Plain SL sends none: u's shape, which no one reads
        (the edge session asks before it looks at the mode)."""
        shape = self.cut.edge_factor_shape(hidden, intermediate)
        return (intermediate, self.rank) if shape is None else shape


def session_fingerprint(
    base_fingerprint: str,
    spec: SplitSpec,
    num_labels: int,
    lora: Optional[dict] = None,
    tail_layers: Optional[int] = None,
) -> str:
    """sha256 over the base model's fingerprint and everything that shapes the two halves
    (``lora``: the adapters' rank, alpha and targets; absent for full fine-tuning). ``tail_layers``:
    a label-private (U-shaped) session with that many tail layers; None: the two-part split, whose
    fingerprint is unchanged."""
    payload: dict = {
        "base": base_fingerprint,
        "spec": asdict(spec),
        "num_labels": num_labels,
    }
    if lora is not None:
        payload["lora"] = lora
    if tail_layers is not None:
        payload["label_private"] = True
        payload["tail_layers"] = tail_layers
    if payload["spec"]["factorise"] == FFN_OUTPUT:
        del payload["spec"]["factorise"]  # the default: fingerprints from before --factorise unchanged
    if payload["spec"]["mode"] == "sl":
        payload["spec"]["rank"] = 0  # rank does not shape plain split learning
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()
