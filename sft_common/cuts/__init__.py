"""What replaces the module at a cut: one ``Cut`` class per kind, picked once from a split's settings.

``cut_of(spec)`` resolves a spec's (mode, factorise) to its ``Cut`` through ``CUTS``, as
``models.families`` resolves a config to its ``Family``; the builders (``topology.two_part``,
``topology.ushape``) ask the object and never test the mode. Adding a kind of cut (a quantised
full-width wire, say): one ``Cut`` subclass in a module of its own, one entry in ``CUTS``, and its
row in tests/sft_common/cuts/test_cuts.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Tuple, Type

from sft_common.cuts.base import FFN_INPUT, FFN_OUTPUT, Cut
from sft_common.cuts.ffn_output import FFNOutputCut
from sft_common.cuts.full_width import FullWidth
from sft_common.cuts.input_cut import FFNInputCut

if TYPE_CHECKING:
    from sft_common.topology.spec import SplitSpec

__all__ = ["CUTS", "Cut", "FFNInputCut", "FFNOutputCut", "FullWidth", "cut_of"]

# (mode, factorise) -> the cut; plain split learning factorises nothing (its factorise: the default).
CUTS: Dict[Tuple[str, str], Type[Cut]] = {
    ("sl", FFN_OUTPUT): FullWidth,
    ("sft", FFN_OUTPUT): FFNOutputCut,
    ("sft", FFN_INPUT): FFNInputCut,
}


def cut_of(spec: SplitSpec) -> Cut:
    """The spec's cut, with its rank and flags; ValueError for a pair no cut implements."""
    kind = CUTS.get((spec.mode, spec.factorise))
    if kind is None:
        raise ValueError(f"no cut for mode {spec.mode!r} with factorise {spec.factorise!r}")
    return kind(spec.rank, spec.keep_residual)
