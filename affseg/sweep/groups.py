"""Fused trials in a sweep (SPEC §5.4): one Ray Tune trial trains a group of Optuna trials ("members") on one
teacher pass per micro-batch.

Each member keeps what an unfused trial has: its Optuna trial (reports and pruning through its own
`TrialLink`), its MLflow child run (`MlflowCallback`), its checkpoints (`<scratch>/train/<number>/`).
A validation of the group is one Ray report: every live member's metrics under `<number>/<key>`
(`member_key`), plus the group's best objective; its checkpoint holds one folder per live member and
`left.json`, the members that left (pruned) before it. A pruned member leaves the group, the others go on;
the group ends with its last member. After a lost worker or a resumed sweep the group restarts from that
checkpoint with the members that had not left. A member's child run ends when it leaves (`MemberTracker`),
as an unfused trial's ends when it is pruned, not when its group ends.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from ray import tune

from affseg.callbacks import TrainResult
from affseg.engine.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT
from affseg.sweep.pruning import OBJECTIVE_KEY, PRUNED_KEY, TrialLink, member_key
from affseg.sweep.trial_logging import MlflowCallback

LEFT_FILE = "left.json"  # in a group checkpoint: Optuna numbers of the members that left before it


def members_of(trial_config: dict) -> list[dict]:
    """The `{"params", "optuna_trial"}` configs a Ray trial trains: one, or its group's members."""
    return list(trial_config["members"]) if "members" in trial_config else [trial_config]


class MemberTracker(MlflowCallback):
    """A member's child run, ended (best checkpoint logged, state `pruned`) as soon as the member leaves the
    group, as an unfused trial's run ends with its training. Waiting for the group's end would lose both when
    the group's worker or the driver dies first: the group's next checkpoint no longer holds the member."""

    ended = False

    def leave(self, out_dir: Path, iteration: int) -> None:
        self.on_end(TrainResult(best=None, best_checkpoint=out_dir / BEST_CHECKPOINT,
                                last_checkpoint=out_dir / LAST_CHECKPOINT, iterations_done=iteration,
                                stopped_early=True))

    def on_end(self, result: TrainResult) -> None:
        if not self.ended:  # the group's end calls it again for the members that left
            self.ended = True
            super().on_end(result)

    def mark_failed(self, error: BaseException) -> None:
        if not self.ended:  # a member that left stays pruned, whatever happens to the group afterwards
            super().mark_failed(error)


class GroupSink:
    """Collects the members' reports of one validation and hands them to Ray as one result."""

    def __init__(self, numbers: Sequence[int], stage: Path, left: Sequence[int] = (),
                 trackers: dict[int, MemberTracker] | None = None):
        self.alive = list(numbers)
        self.left = list(left)
        self.stage_dir = stage
        self.trackers = {} if trackers is None else trackers  # number → its child run, ended when it leaves
        self.pending: dict[int, tuple[object, dict, Path]] = {}

    def __call__(self, reporter, report: dict, checkpoint: Path) -> None:
        self.pending[reporter.link.number] = (reporter, report, checkpoint)
        if set(self.pending) == set(self.alive):
            self._flush()

    def _flush(self) -> None:
        shutil.rmtree(self.stage_dir, ignore_errors=True)
        self.stage_dir.mkdir(parents=True)
        result: dict = {}
        for number, (reporter, report, checkpoint) in self.pending.items():
            reporter.stage(checkpoint, self.stage_dir / str(number))
            result.update({member_key(number, key): value for key, value in report.items()})
        (self.stage_dir / LEFT_FILE).write_text(json.dumps(self.left))
        reports = [report for _, report, _ in self.pending.values()]
        best = [r[OBJECTIVE_KEY] for r in reports]
        mode = next(iter(self.pending.values()))[0].mode
        result[OBJECTIVE_KEY] = max(best) if mode == "max" else min(best)
        from affseg.sweep.trial import ITERATION_KEY

        result[ITERATION_KEY] = reports[0][ITERATION_KEY]
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(self.stage_dir)))
        for number, (reporter, report, _) in self.pending.items():
            if report[PRUNED_KEY]:
                self.alive.remove(number)
                self.left.append(number)
                if number in self.trackers:
                    self.trackers[number].leave(reporter.out_dir, report[ITERATION_KEY])
        self.pending.clear()


def _restore_group(scratch: Path) -> tuple[dict[int, tuple[Path, float]], list[int]]:
    """Ray's last checkpoint of this group, unpacked into `scratch`: {number: (last.pt, objective)}, left."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return {}, []
    from affseg.sweep.trial import OBJECTIVE_FILE

    restored = scratch / "restored"
    checkpoint.to_directory(str(restored))
    members = {}
    for folder in restored.iterdir():
        if folder.is_dir() and folder.name.isdigit():
            objective = json.loads((folder / OBJECTIVE_FILE).read_text())[OBJECTIVE_KEY]
            members[int(folder.name)] = (folder / LAST_CHECKPOINT, objective)
    return members, json.loads((restored / LEFT_FILE).read_text())


def run_group(members: list[dict], context) -> None:
    """Train the group's members that have not finished, resumed from the group's last checkpoint."""
    from affseg.engine.trainer import Member
    from affseg.sweep.trial import STAGE_DIR, TRAIN_DIR, TuneReporter, trial_scratch

    scratch = trial_scratch()
    restored, left = _restore_group(scratch)
    links = {m["optuna_trial"]: TrialLink(context.study, m["optuna_trial"]) for m in members}
    live = [m for m in members if m["optuna_trial"] not in left and not links[m["optuna_trial"]].finished()]
    if not live:
        return
    trackers: dict[int, MemberTracker] = {}
    sink = GroupSink([m["optuna_trial"] for m in live], scratch / STAGE_DIR, left, trackers)
    group = []
    for member in live:
        number = member["optuna_trial"]
        out_dir = scratch / TRAIN_DIR / str(number)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = context.spec.trial_config(member["params"], {"train.out_dir": str(out_dir)})
        resume_from, objective = restored.get(number, (None, None))
        tracker = trackers[number] = MemberTracker(context.tracking, number, config, member["params"])
        reporter = TuneReporter(links[number], context.spec.metric, context.spec.mode, out_dir, objective, sink)
        group.append(Member(config, [tracker, reporter], resume_from))
    train_fused = context.fused_train_fn
    if train_fused is None:
        from affseg.train import train_fused
    try:
        train_fused(group)
    except Exception as err:
        for tracker in trackers.values():
            tracker.mark_failed(err)
        raise
    shutil.rmtree(scratch / TRAIN_DIR, ignore_errors=True)
