"""The product keeps its shape (tests/code_shape.py): modules <= 400 lines, functions <= 80, no
private name imported across modules, no line packing, at most 40 branches on the run's kind."""

from __future__ import annotations

import code_shape


def test_the_product_keeps_its_shape():
    assert code_shape.breaches() == []


def test_a_branch_on_the_run_kind_is_counted_and_a_resolver_or_choice_check_is_not(tmp_path):
    """The counter itself: a branch on a kind counts; the resolver and a flag's choices check do not."""
    package = tmp_path / "sft_edge"
    package.mkdir()
    (package / "m.py").write_text(
        "def kind_of(cfg):\n"
        "    return 1 if cfg.local else 2\n"
        "def train(cfg):\n"
        "    if cfg.mode not in ('sft', 'sl'):\n"
        "        raise ValueError\n"
        "    if cfg.label_private:\n"
        "        return [x for x in cfg.xs if x.mode == 'sft']\n"
    )
    assert code_shape.kind_branches(str(tmp_path)) == ["sft_edge/m.py:6", "sft_edge/m.py:7"]
