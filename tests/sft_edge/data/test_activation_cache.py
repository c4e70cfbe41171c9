"""The forward-only run's activation cache: it gives back what was put, and nothing that was not."""

from __future__ import annotations

import os

import pytest
import torch

from sft_edge.data.activation_cache import ActivationCache, CacheMismatch, example_key

IDENTITY = {"base": "abc", "split_layer": 0, "tail_layers": 1, "wire_dtype": "fp32"}


@pytest.mark.parametrize("on_disk", [True, False], ids=["disk", "memory"])
def test_an_answer_put_is_read_back_bit_for_bit(tmp_path, on_disk):
    cache = ActivationCache(str(tmp_path / "c") if on_disk else None, IDENTITY, 1.0)
    key, rows = example_key(torch.tensor([5, 6, 7])), torch.randn(3, 16)
    assert cache.get(key, 3) is None and cache.misses == 1
    assert cache.put(key, {"rows": rows})
    got = cache.get(key, 3)
    assert got is not None and torch.equal(got["rows"], rows) and cache.hits == 1
    assert cache.get(key, 4) is None  # another length: not this example's answer


def test_a_folder_made_for_another_base_cut_or_wire_is_refused(tmp_path):
    ActivationCache(str(tmp_path), IDENTITY, 1.0).put(
        example_key(torch.tensor([1])), {"rows": torch.ones(1, 4)}
    )
    for name, value in (("base", "other"), ("split_layer", 2), ("wire_dtype", "int8")):
        with pytest.raises(CacheMismatch, match=f"{name}: "):
            ActivationCache(str(tmp_path), {**IDENTITY, name: value}, 1.0)
    reopened = ActivationCache(str(tmp_path), IDENTITY, 1.0)  # the same identity reads it
    assert reopened.get(example_key(torch.tensor([1])), 1) is not None and reopened.used > 0


def test_a_changed_example_or_a_file_under_another_name_is_not_read(tmp_path):
    cache = ActivationCache(str(tmp_path), IDENTITY, 1.0)
    key = example_key(torch.tensor([1, 2, 3]))
    cache.put(key, {"rows": torch.ones(3, 4)})
    assert example_key(torch.tensor([1, 2, 4])) != key
    assert example_key(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 1])) != key  # segments count too
    other = example_key(torch.tensor([9, 9, 9]))
    os.rename(tmp_path / f"{key}.safetensors", tmp_path / f"{other}.safetensors")
    assert cache.get(other, 3) is None  # the file says it holds another example's answer
    (tmp_path / f"{key}.safetensors").write_bytes(b"\x00" * 20)  # a torn or foreign file
    assert cache.get(key, 3) is None


def test_past_the_budget_an_answer_is_not_kept(tmp_path):
    cache = ActivationCache(str(tmp_path), IDENTITY, 100 * 4 / 2**20)  # room for 100 floats
    assert cache.put(example_key(torch.tensor([1])), {"rows": torch.ones(10, 8)})
    assert not cache.put(example_key(torch.tensor([2])), {"rows": torch.ones(10, 8)}) and cache.skipped == 1
    assert cache.get(example_key(torch.tensor([2])), 10) is None


@pytest.mark.parametrize("on_disk", [True, False], ids=["disk", "memory"])
def test_the_side_networks_taps_are_kept_with_the_answer_in_one_file(tmp_path, on_disk):
    """``--adapters parallel``: both tensors of an example, read back together, in one file; the
    budget counts both; a folder made without taps (no side width) is refused, and the reverse."""
    folder = str(tmp_path / "c") if on_disk else None
    with_side = {**IDENTITY, "side_width": 32}
    cache = ActivationCache(folder, with_side, 1.0)
    key, answer = example_key(torch.tensor([5, 6])), {"rows": torch.randn(2, 16), "side": torch.randn(2, 96)}
    assert cache.put(key, answer) and cache.used == 2 * (16 + 96) * 4
    got = cache.get(key, 2)
    assert got is not None and got.keys() == answer.keys()
    assert all(torch.equal(got[k], answer[k]) for k in answer)
    if on_disk:
        assert sorted(os.listdir(tmp_path / "c")) == sorted(["cache.json", f"{key}.safetensors"])
        ActivationCache(str(tmp_path / "plain"), IDENTITY, 1.0)
        with pytest.raises(CacheMismatch, match="side_width: None there, 32 here"):
            ActivationCache(str(tmp_path / "plain"), with_side, 1.0)
        with pytest.raises(CacheMismatch, match="side_width: 32 there, None here"):
            ActivationCache(folder, IDENTITY, 1.0)
