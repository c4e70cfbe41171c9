"""Checkpoint pack/unpack: what a resume restores, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from sft_common.storage import checkpoint
from sft_common.training import make_optimizer, make_schedule


def _parts(factor_lr):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = make_optimizer(module.parameters(), 1e-3, 0.0, [module[1].weight], factor_lr)
    return module, opt, make_schedule(opt, 0, 10)


def test_two_groups_round_trip_with_their_learning_rates():
    module, opt, sched = _parts(1e-2)
    module(torch.ones(1, 4)).sum().backward()
    opt.step(), sched.step()
    tensors, meta = checkpoint.pack(module, opt, sched)
    fresh, fresh_opt, fresh_sched = _parts(1e-2)
    checkpoint.unpack(tensors, meta, fresh, fresh_opt, fresh_sched)
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in opt.param_groups]
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), fresh.state_dict().values()))


@pytest.mark.parametrize("saved, resumed", [(1e-2, None), (None, 1e-2)])
def test_a_resume_with_or_without_factor_lr_unlike_the_saved_run_is_refused(saved, resumed):
    tensors, meta = checkpoint.pack(*_parts(saved))
    with pytest.raises(ValueError, match="resume with the --factor-lr of the run that wrote it"):
        checkpoint.unpack(tensors, meta, *_parts(resumed))


def test_checkpoint_dir_names_lists_newest_first_prunes_and_reads_meta_alone(tmp_path):
    ckpts = checkpoint.CheckpointDir(str(tmp_path / "ckpts"), keep=2)
    assert ckpts.steps() == []  # the folder does not exist yet
    assert ckpts.path(7) == str(tmp_path / "ckpts" / "step-000000007.safetensors")
    for step in (3, 1, 2):
        ckpts.save(step, {"w": torch.full((2,), float(step))}, {"step": step})
    assert ckpts.steps() == [3, 2]  # newest first; step 1 was pruned when step 2 made three
    (tmp_path / "ckpts" / "step-000000009.safetensors.tmp-123").write_bytes(b"half a file")
    (tmp_path / "ckpts" / "final.safetensors").write_bytes(b"not a step")
    assert ckpts.steps() == [3, 2]  # temporary and other files are not checkpoints
    assert ckpts.meta(3) == {"step": 3}  # the header alone
    tensors, meta = ckpts.load(2)
    assert meta == {"step": 2} and torch.equal(tensors["w"], torch.full((2,), 2.0))
    ckpts.clear()
    assert ckpts.steps() == [] and (tmp_path / "ckpts" / "final.safetensors").exists()
