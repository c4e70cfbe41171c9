"""LoRA on a half of the split model, through PEFT (``--peft lora``).

PEFT's ``inject_adapter_in_model`` puts adapters on the named linear layers of a half (by default
the family's attention query and value projections); everything else is frozen except the SVD
factors at the cut (u on the edge; Σ and v on the cloud) and, on the cloud, the task head, which
stay fully trainable. The adapters' random initialisation is drawn from ``(seed, side)``, so the
edge, the cloud and a one-process reference build the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from sft_common.models.shared import shared_name
from sft_common.training import step_seed

# The attention projections LoRA adapts by default, per model_type (the LoRA paper's q and v).
DEFAULT_TARGETS: Dict[str, Tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "deberta-v2": ("query_proj", "value_proj"),
    "modernbert": ("Wqkv",),  # query, key and value in one projection
}


@dataclass(frozen=True)
class LoraSpec:
    """What ``--peft lora --lora-rank --lora-alpha --lora-targets`` ask for."""

    rank: int = 8  # r: the adapters' inner width
    alpha: float = 16.0  # scaling alpha / r
    targets: Tuple[str, ...] = ()  # module names to adapt; () = the family's default

    def validate(self) -> None:
        if self.rank < 1 or not self.alpha > 0:
            raise ValueError(
                f"--lora-rank must be >= 1 and --lora-alpha > 0, got {self.rank} and {self.alpha}"
            )

    def resolved(self, model_type: str) -> LoraSpec:
        """With the family's default targets filled in."""
        if self.targets:
            return self
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"no default --lora-targets for model type {model_type!r}; name them")
        return LoraSpec(self.rank, self.alpha, DEFAULT_TARGETS[model_type])

    def as_dict(self) -> Dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Dict) -> LoraSpec:
        return cls(int(d["rank"]), float(d["alpha"]), tuple(d["targets"]))


def resolve_lora(lora: Optional[LoraSpec], model_type: str) -> Optional[LoraSpec]:
    """The LoRA asked for with the family's default targets filled in; None: full fine-tuning."""
    return None if lora is None else lora.resolved(model_type)


def lora_record(lora: Optional[LoraSpec]) -> Optional[Dict]:
    """What a fingerprint and a run's record hold of the LoRA (None: full fine-tuning)."""
    return None if lora is None else lora.as_dict()


def apply_lora(half: nn.Module, spec: LoraSpec, seed: int, side: str, keep: List[nn.Parameter]) -> None:
    """Adapters on ``half`` (in place), its other parameters frozen except ``keep`` (the SVD
    factors, the head). ``side``: "edge" or "cloud", which seeds the adapters' initialisation."""
    from peft import LoraConfig, inject_adapter_in_model

    # PEFT types lora_alpha as int; it scales by alpha / r, so a float works the same
    alpha: Any = spec.alpha
    config = LoraConfig(r=spec.rank, lora_alpha=alpha, target_modules=list(spec.targets), lora_dropout=0.0)
    # A cloud half cut at the last layer holds no attention: nothing to adapt there, only the
    # factors and the head train (the edge, which holds layer l's attention, checks the names).
    if any(name.rsplit(".", 1)[-1] in spec.targets for name, _ in half.named_modules()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(seed, f"lora-{side}", 0))
            inject_adapter_in_model(config, half)
    elif side != "cloud":
        raise ValueError(f"no module named {', '.join(spec.targets)} to adapt (see --lora-targets)")
    kept = {id(p) for p in keep}
    for name, param in half.named_parameters():
        param.requires_grad_("lora_" in name or id(param) in kept)


def head_parameters(half: Any) -> List[nn.Parameter]:
    """A cloud half's task head (``Family.head``: BERT's pooler and classifier, RoBERTa's
    classification head, a decoder's score), which LoRA leaves fully trainable."""
    return [p for name in half.head_names for p in getattr(half, name).parameters()]


def lora_on_model(model: Any, spec: LoraSpec, seed: int) -> None:
    """The whole model with adapters (``--local``, and loading its weights); its head stays trainable."""
    from sft_common.models.base_model import family_of

    head = [p for m in family_of(model.config).head(model).values() for p in m.parameters()]
    apply_lora(model, spec.resolved(model.config.model_type), seed, "local", keep=head)


def lora_on_halves(edge: nn.Module, cloud: nn.Module, spec: LoraSpec, seed: int) -> None:
    """Both halves in one process with the adapters each side gives its own (the reference split
    training is compared with, and loading an export): u on the edge, Σ, v and the head on the cloud
    stay trainable."""
    from sft_common.topology.two_part import factor_parameters

    apply_lora(edge, spec, seed, "edge", keep=factor_parameters(edge))
    apply_lora(cloud, spec, seed, "cloud", keep=factor_parameters(cloud) + head_parameters(cloud))


def lora_from_config(config, base) -> Optional[LoraSpec]:
    """The LoRA a session config asks for (``lora_rank`` 0: none), checked, targets resolved;
    ValueError saying what is wrong."""
    if not config.lora_rank:
        if config.lora_targets or config.lora_alpha:
            raise ValueError("lora_targets and lora_alpha need lora_rank >= 1")
        return None
    spec = LoraSpec(int(config.lora_rank), float(config.lora_alpha), tuple(config.lora_targets))
    spec.validate()
    return spec.resolved(base.config.model_type)


def share_frozen(module: nn.Module, shared: Dict[str, torch.Tensor]) -> None:
    """Make ``module``'s frozen parameters the tensors in ``shared`` (by name), filling it with
    its own where it has none yet: sessions of one model and split hold one frozen base. The
    names are ``shared.shared_name``'s, as ``shared.build_on`` put them in place before LoRA."""
    for name, param in list(module.named_parameters()):
        if param.requires_grad:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        held = shared.setdefault(shared_name(name), param)
        if held is not param:
            assert held.shape == param.shape, (
                f"{name}: shared {tuple(held.shape)}, this session {tuple(param.shape)}"
            )
            setattr(owner, attr, held)
