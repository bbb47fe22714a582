"""When a run pauses for its bookkeeping (`trainer.cadence`), step by step, as the train
loop asks: where the next pause is, and what it calls for."""

import pytest

from trainer.cadence import CHECKPOINT_MINUTES, EVAL_SHARE, PACE_STEPS, REFRESH_EPOCHS, Cadence
from trainer.config import Config
from trainer.schedule import run_length


def walk(cadence: Cadence, per_epoch: int, pace: float | None = None, eval_seconds: float = 0.0) -> list[tuple]:
    """The pauses of a whole run as the train loop takes them: (step, epoch end, due)."""
    pauses, step, epoch_start = [], 0, 0
    for _ in range(10_000):  # bounded: a run never pauses more often than every step
        if step >= cadence.total:
            return pauses
        epoch_end = epoch_start + per_epoch
        step = cadence.next_stop(step, epoch_end)
        ended = step == epoch_end
        if ended:
            epoch_start = step
        due = cadence.due(step, ended)
        cadence.done(step, due, eval_seconds)
        cadence.agree(step, pace)
        pauses.append((step, ended, due.refresh, due.evaluate, due.checkpoint))
    raise AssertionError("the walk did not end")


def cadence_of(*overrides: str, rows: int = 1000, batch: int = 100, steps: int = 95, evaluates: bool = True):
    values = {"train": {"steps": steps, "batch_size": batch}}
    for pair in overrides:
        key, value = pair.split("=")
        section, name = key.split(".")
        values.setdefault(section, {})[name] = None if value == "null" else int(value)
    config = Config.from_dict(values)
    length = run_length(rows, batch, 0, steps)
    return Cadence(config, length, 0, evaluates), length.steps_per_epoch


def test_fixed_cadences_fall_on_multiples_of_their_steps_and_the_last_step_always():
    cadence, per_epoch = cadence_of("train.refresh_bank_every=20", "eval.every=30", "train.checkpoint_every=25")
    pauses = walk(cadence, per_epoch)
    refreshed = [p[0] for p in pauses if p[2]]
    evaluated = [p[0] for p in pauses if p[3]]
    checkpointed = [p[0] for p in pauses if p[4]]
    assert refreshed == [20, 40, 60, 80]
    assert evaluated == [30, 60, 90, 95]
    assert checkpointed == [25, 50, 75, 95]
    assert [p[0] for p in pauses if p[1]] == [10 * e for e in range(1, 10)]  # the epochs' ends (the 10th is cut)
    assert all(p[0] % 10 == 0 or p[0] in (25, 75, 95) or p[0] == PACE_STEPS for p in pauses)


def test_checkpoint_every_0_checkpoints_at_epoch_ends():
    cadence, per_epoch = cadence_of("train.checkpoint_every=0", "eval.every=1000")
    assert [p[0] for p in walk(cadence, per_epoch) if p[4]] == [10 * e for e in range(1, 10)] + [95]


def test_unset_cadences_keep_their_share_of_the_time():
    # 10-step epochs, 0.1 s a step, 2 s an evaluation: one every 2 / (EVAL_SHARE * 0.1)
    # steps; the refresh every REFRESH_EPOCHS epochs; checkpoints every 30 minutes.
    cadence, per_epoch = cadence_of(steps=2000)
    pauses = walk(cadence, per_epoch, pace=0.1, eval_seconds=2.0)
    gap = round(2.0 / (EVAL_SHARE * 0.1))
    evaluated = [p[0] for p in pauses if p[3]]
    assert evaluated[0] == PACE_STEPS  # its cost was not known yet: measured once the pace is
    assert evaluated[1:] == [PACE_STEPS + gap * i for i in range(1, len(evaluated) - 1)] + [2000]
    assert [p[0] for p in pauses if p[2]][:2] == [REFRESH_EPOCHS * 10, 2 * REFRESH_EPOCHS * 10]
    every = CHECKPOINT_MINUTES * 60 / 0.1
    assert [p[0] for p in pauses if p[4]] == [2000]  # 2,000 steps of 0.1 s: under 30 minutes
    long, per_epoch = cadence_of(steps=40_000)
    checkpointed = [p[0] for p in walk(long, per_epoch, pace=0.1, eval_seconds=2.0) if p[4]]
    assert checkpointed == [int(every), int(2 * every), 40_000]


def test_a_timed_plan_never_falls_behind_the_step_it_is_made_at():
    cadence, per_epoch = cadence_of(steps=40_000)
    cadence.agree(PACE_STEPS, 0.1)  # 30 minutes at 0.1 s a step: step 18,000
    assert cadence.next_checkpoint == 18_000
    cadence.agree(17_600, 0.103)  # slower since: 17,476, already behind
    assert cadence.next_checkpoint == 17_601 and cadence.next_stop(17_600, 17_610) == 17_601
    assert cadence.due(17_601, False).checkpoint


def test_nothing_evaluates_without_an_evaluation_split():
    cadence, per_epoch = cadence_of("eval.every=10", evaluates=False)
    assert not any(p[3] for p in walk(cadence, per_epoch, pace=0.1))


@pytest.mark.parametrize("key", ["train.checkpoint_every=-1", "train.refresh_bank_every=-5", "eval.every=0"])
def test_negative_cadences_are_refused(key):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=key.split("=")[0]):
        cadence_of(key)
