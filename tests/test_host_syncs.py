"""Issue 13: a training micro-batch reads nothing back from the device.

On a GPU every `.item()`, `bool(tensor)`, `torch.equal`, `.tolist()` or data-dependent shape waits for
the device to drain. On the CPU there is no device to wait for, so the test counts the calls that would
sync instead: the Tensor methods and torch functions through which Python reads a tensor's value or a
value-dependent shape, patched for one non-log micro-batch (the teacher pass, the students, the
pseudo-labels with A_f and PAR, the losses and the backward), AMP off."""

from __future__ import annotations

import sys

import pytest
import torch

from affseg.config import load_config
from affseg.engine.trainer import Member, Trainer
from affseg.slots import max_present

READS = {  # (owner, name): Python-level calls that read device values on the host
    (torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "numpy"), (torch.Tensor, "__bool__"),
    (torch.Tensor, "__int__"), (torch.Tensor, "__float__"), (torch.Tensor, "__index__"), (torch.Tensor, "nonzero"),
    (torch, "equal"), (torch, "nonzero"), (torch, "unique"), (torch, "masked_select"),
    (torch.Tensor, "masked_select"), (torch.Tensor, "cpu"),
}


def _config(root, out, *extra):
    return load_config(None, [
        f"data.root={root}", "data.demo=false", "model.encoder=unicl_swin_tiny", "model.checkpoint=random",
        "model.decoder_dim=32", "model.decoder_mlp_dim=32", "model.decoder_layers=1", "model.decoder_heads=2",
        "data.crop_size=96", "train.batch_size=2", "train.accumulation=2", "train.iterations=100",
        "train.log_interval=50", "train.val_interval=50", "train.amp=off", "data.num_workers=0", f"train.out_dir={out}", *extra,
    ])


class _Counter:
    """Wraps every READS entry; `calls` names each read made while `counting` is set, and where."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self.counting = False
        for owner, name in READS:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))

    def _wrap(self, original, name):
        def counted(*args, **kwargs):
            if self.counting:
                caller = sys._getframe(1)
                self.calls.append(f"{name} at {caller.f_code.co_filename.rsplit('/', 2)[-1]}:{caller.f_lineno}")
            return original(*args, **kwargs)
        return counted


@pytest.mark.parametrize("heads, batch_heads", [(1, "never"), (2, "never"), (2, "always")])
def test_a_training_micro_batch_reads_nothing_from_the_device(small_demo, tmp_path, monkeypatch, heads, batch_heads):
    members = [Member(_config(small_demo, tmp_path / str(k), f"refine.alpha={k + 1}", f"train.batch_heads={batch_heads}"))
               for k in range(heads)]
    trainer = Trainer.fused(members)
    batch = next(iter(trainer._loader()))
    trainer.iteration = trainer.heads[0].labeler.refine_start + 1  # A_f takes part; not a log step
    assert not trainer.reads_host()
    trainer.teacher(batch["image"], batch["labels"], batch["valid"])  # the teacher's first-batch gradient check
    for head in trainer.heads:
        head.begin_step()
    counter = _Counter(monkeypatch)
    counter.counting = True
    slots = max_present(batch["labels"])  # the trainer's read of the CPU labels, before they move ...
    assert counter.calls and counter.calls[0].startswith("__int__")  # ... which the counter does see
    counter.calls = []
    teacher = trainer.teacher(batch["image"], batch["labels"], batch["valid"], slots)
    if len(trainer.heads) > 1:  # as `Trainer._step` runs a micro-batch
        trainer._group_micro_batch(trainer.heads, teacher, batch["mask"])
    else:
        trainer.heads[0].micro_batch(teacher, batch["mask"], trainer.iteration)
    counter.counting = False
    assert counter.calls == []
    counter.counting = True
    for head in trainer.heads:
        head.finish_step()
    counter.counting = False
    # on the CPU AdamW keeps its step count on the host and reads it there (optimizer.py's `_get_value`); on
    # CUDA the heads' AdamW is capturable, the count on the device
    assert [call for call in counter.calls if "optimizer.py" not in call] == []
    assert all(p.grad is not None for head in trainer.heads for p in head.student.decoder.parameters())
