"""Fused trials (SPEC §5.4): K configurations on one teacher pass give, per member, what each gives alone."""

from __future__ import annotations

import math

import pytest
from one_head_reference import _Recorder
from test_train import tiny_config

from affseg.callbacks import Callback
from affseg.config import ConfigError
from affseg.engine.trainer import Member, Trainer
from affseg.train import train, train_fused

# Same data order and teacher outputs; each student sees the same tensors as alone, so only float
# reduction order could differ — on one CPU thread count nothing does: equality to 1e-6.
TOLERANCE = 1e-6
MEMBERS = (("refine.alpha=1", "loss.lam=0.1", "optim.lr=1e-3"),
           ("refine.alpha=3", "loss.lam=0.5", "optim.lr=2e-3"),
           ("refine.n0=4", "refine.box_mask=source", "optim.weight_decay=0.05"))
SCHEDULE = ("train.iterations=4", "train.val_interval=2", "refine.refine_start=0.5")


class StopAtFirstValidation(Callback):
    def should_stop(self) -> bool:
        return True


def _config(root, out, overrides):
    return tiny_config(root, out, *SCHEDULE, *overrides)


def _same(actual: _Recorder, expected: _Recorder) -> None:
    assert actual.logs.keys() == expected.logs.keys()
    for iteration, values in expected.logs.items():
        for key, value in values.items():
            assert math.isclose(actual.logs[iteration][key], value, abs_tol=TOLERANCE), (iteration, key)
    assert len(actual.validations) == len(expected.validations)
    for got, want in zip(actual.validations, expected.validations):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert math.isclose(got[key], value, abs_tol=TOLERANCE), (want["iteration"], key)


@pytest.mark.parametrize("batch_heads", ["never", "always"])
def test_each_member_of_a_group_trains_as_it_would_alone(small_demo, tmp_path, batch_heads):
    """With `always`, the decoders run as one vmap-ed call (affseg.engine.batched) and still match the runs alone."""
    alone = []
    for index, overrides in enumerate(MEMBERS):
        recorder = _Recorder()
        train(_config(small_demo, tmp_path / f"alone{index}", overrides), [recorder])
        alone.append(recorder)
    fused = [_Recorder() for _ in MEMBERS]
    stopper = [[], [StopAtFirstValidation()], []]  # member 1 is pruned at its first validation and leaves
    results = train_fused([Member(_config(small_demo, tmp_path / f"fused{i}", (*o, f"train.batch_heads={batch_heads}")),
                                  [fused[i], *stopper[i]]) for i, o in enumerate(MEMBERS)])
    _same(fused[0], alone[0])
    _same(fused[2], alone[2])
    assert results[1].stopped_early and [v["iteration"] for v in fused[1].validations] == [2]
    assert fused[1].logs == {k: v for k, v in alone[1].logs.items() if int(k) <= 2}
    assert not results[0].stopped_early and results[0].iterations_done == 4
    for index in range(len(MEMBERS)):
        assert (tmp_path / f"fused{index}" / "last.pt").is_file()


def test_a_key_outside_the_fusable_set_is_refused_in_one_line(small_demo, tmp_path):
    members = [Member(_config(small_demo, tmp_path / "a", ())),
               Member(_config(small_demo, tmp_path / "b", ("model.decoder_dim=16",)))]
    with pytest.raises(ConfigError, match=r"^model.decoder_dim: 32 vs 16 inside one fused group; it cannot be fused"):
        Trainer.fused(members)


def test_members_need_their_own_folders(small_demo, tmp_path):
    members = [Member(_config(small_demo, tmp_path / "a", ("refine.alpha=1",))),
               Member(_config(small_demo, tmp_path / "a", ("refine.alpha=2",)))]
    with pytest.raises(ConfigError, match="train.out_dir: fused members need one folder each"):
        Trainer.fused(members)


def test_heads_with_the_same_par_settings_share_one_image_kernel(small_demo, tmp_path, monkeypatch):
    import affseg.method.labeler

    calls = []
    original = affseg.method.labeler.image_kernel
    monkeypatch.setattr(affseg.method.labeler, "image_kernel", lambda *a, **k: calls.append(1) or original(*a, **k))
    members = [Member(_config(small_demo, tmp_path / str(i), o)) for i, o in enumerate(MEMBERS)]
    trainer = Trainer.fused(members)
    trainer._step(iter(trainer._loader()))
    assert len(calls) == trainer.config.train.accumulation  # one per micro-batch, not one per head


def test_heads_with_the_same_par_settings_run_par_as_one_call(small_demo, tmp_path, monkeypatch):
    """`refine_together`: one PAR per PAR setting over all those heads' maps, and each head gets exactly the
    pseudo-labels it gets alone."""
    import torch

    import affseg.method.labeler as labeler_module
    from affseg.refine.pseudo import pseudo_labels

    overrides = [*MEMBERS, ("refine.par.iterations=5",), ("refine.par.enabled=false",)]
    trainer = Trainer.fused([Member(_config(small_demo, tmp_path / str(i), o)) for i, o in enumerate(overrides)])
    batch = next(iter(trainer._loader()))
    teacher = trainer.teacher(batch["image"], batch["labels"], batch["valid"])
    labelers = [head.labeler for head in trainer.heads]
    with torch.no_grad():
        aff_decs = [head.forward(teacher).aff_dec for head in trainer.heads]
    alone = []  # each labeler's refinement and PAR on its own, through `pseudo_labels`, not `refine_together`
    for labeler, aff_dec in zip(labelers, aff_decs):
        refined, _ = labeler._refine(teacher, aff_dec, 3)
        alone.append((refined, pseudo_labels(refined, teacher.labels, teacher.images.float(), labeler.settings,
                                             use_par=labeler.settings.par.enabled, valid=teacher.valid,
                                             slots=teacher.slots)))
    columns = []
    original = labeler_module.par
    monkeypatch.setattr(labeler_module, "par", lambda images, maps, *a, **k: columns.append(maps.shape[1]) or
                        original(images, maps, *a, **k))
    together = labeler_module.refine_together(labelers, teacher, aff_decs, 3)
    slots = 1 + max(1, int(batch["labels"].sum(dim=1).max()))
    assert columns == [3 * slots, slots]  # the three members with default PAR at once, then iterations=5
    for (refined, pseudo), joint in zip(alone, together):
        assert torch.equal(pseudo, joint.pseudo) and torch.equal(refined, joint.refined)


def test_a_group_validates_on_one_encoder_forward_per_image(small_demo, tmp_path, monkeypatch):
    from affseg.validate import validate, validate_heads

    members = [Member(_config(small_demo, tmp_path / str(i), o)) for i, o in enumerate(MEMBERS)]
    trainer = Trainer.fused(members)
    encoder = trainer.teacher.encoder
    encoded, original = [], encoder.encode_image
    monkeypatch.setattr(encoder, "encode_image", lambda images, *a, **k: encoded.append(len(images)) or
                        original(images, *a, **k))
    heads = [(h.student, h.labeler, tmp_path / f"figures{i}") for i, h in enumerate(trainer.heads)]
    together = validate_heads(trainer.teacher, heads, trainer.val_set, trainer.pseudo_set, 2, trainer.runtime)
    assert sum(encoded) == len(trainer.val_set) + len(trainer.pseudo_set)  # not × 3 heads
    for (student, labeler, folder), result in zip(heads, together):
        alone = validate(trainer.teacher, student, labeler, trainer.val_set, trainer.pseudo_set, 2, trainer.runtime,
                         folder)
        assert alone.metrics() == result.metrics()


def test_a_group_that_does_not_fit_is_refused_with_the_largest_k_that_fits(small_demo, tmp_path, monkeypatch):
    import affseg.engine.trainer
    from affseg.engine.checkpoint import TrainingError
    from affseg.engine.memory import head_bytes

    config = _config(small_demo, tmp_path / "x", ())
    per_head = head_bytes(config, parameters=1)  # about the same for every head: the parameters are small
    monkeypatch.setattr(affseg.engine.trainer, "free_bytes", lambda device: int(2.5 * per_head))
    members = [Member(_config(small_demo, tmp_path / str(i), o)) for i, o in enumerate(MEMBERS)]
    with pytest.raises(TrainingError, match=r"^fuse=3: 3 heads need about .* GiB, .* GiB is free on cpu; "
                                            r"the largest fuse that fits is [0-2]$"):
        Trainer.fused(members)
    monkeypatch.setattr(affseg.engine.trainer, "free_bytes", lambda device: 100 * per_head)
    assert len(Trainer.fused(members).heads) == 3
