"""The divergence guard: non-finite values, spikes against a running median, scaler skips,
posterior collapse, the abort rule and resume."""

import json
import math

import pytest

from medvae.config import ConfigError, GuardConfig, load_config
from medvae.train.guard import DivergenceError, DivergenceGuard, GuardEvent, most_severe_action

NAN, INF = float("nan"), float("inf")


def healthy(guard, step, kl=0.1, grad=1.0, loss=0.5, **kwargs):
    args = dict(step=step, loss=loss, kl=kl, grad_norm=grad, kl_per_channel=None,
                step_skipped_by_scaler=False, batch_ids=[f"vol{step}.nii.gz"])
    args.update(kwargs)
    return guard.check(**args)


def stable_history(guard, steps=20, kl=2.0, grad=1.0):
    for step in range(steps):
        # small wiggle so the MAD is not zero
        assert healthy(guard, step, kl=kl * (1 + 0.01 * (step % 3)), grad=grad * (1 + 0.01 * (step % 2))) == []


@pytest.mark.parametrize(
    "field,value,kind",
    [("loss", NAN, "nonfinite_loss"), ("loss", INF, "nonfinite_loss"), ("kl", NAN, "nonfinite_kl"),
     ("grad", INF, "nonfinite_grad"), ("grad", NAN, "nonfinite_grad")],
)
def test_nonfinite_values_are_events_with_the_configured_action(field, value, kind):
    guard = DivergenceGuard(GuardConfig(on_nonfinite="skip"))
    events = healthy(guard, 7, **{field: value})
    assert [e.kind for e in events] == [kind]
    event = events[0]
    assert event.step == 7 and event.action == "skip" and event.batch_ids == ["vol7.nii.gz"]
    assert "\n" not in event.message and kind in event.message and "vol7.nii.gz" in event.message
    assert json.loads(json.dumps(event.to_dict(), default=str))["kind"] == kind


def test_nonfinite_grad_on_a_scaler_skipped_step_is_a_scaler_skip():
    guard = DivergenceGuard(GuardConfig())
    events = healthy(guard, 0, grad=INF, step_skipped_by_scaler=True)
    assert [(e.kind, e.action) for e in events] == [("scaler_skip", "record")]


def test_spike_after_stable_history_is_detected_and_kept_out_of_history():
    cfg = GuardConfig(window=50, min_history=10, spike_factor=10.0, kl_spike_floor=0.0, on_spike="lower_lr")
    guard = DivergenceGuard(cfg)
    stable_history(guard, steps=20, kl=2.0, grad=1.0)
    before = guard.state_dict()
    events = healthy(guard, 20, kl=500.0, grad=1.0)
    assert [(e.kind, e.action) for e in events] == [("kl_spike", "lower_lr")]
    assert events[0].values["median"] == pytest.approx(2.0, rel=0.02)
    assert events[0].values["threshold"] == pytest.approx(10 * events[0].values["median"])
    # neither the spiking KL nor that step's gradient norm entered the history
    assert guard.state_dict()["kl_history"] == before["kl_history"]
    assert guard.state_dict()["grad_history"] == before["grad_history"]
    events = healthy(guard, 21, kl=2.0, grad=50.0)
    assert [e.kind for e in events] == ["grad_spike"]
    assert healthy(guard, 22, kl=2.0, grad=1.0) == []  # the bar did not move


def test_no_spike_is_judged_before_min_history():
    guard = DivergenceGuard(GuardConfig(min_history=10, kl_spike_floor=0.0))
    for step in range(9):
        healthy(guard, step, kl=1.0)
    assert healthy(guard, 9, kl=1000.0) == []  # only 9 steps of history
    assert [e.kind for e in healthy(guard, 10, kl=1000.0)] == ["kl_spike"]  # 10 now (the 1000 counted once)


def test_kl_spike_floor_ignores_growth_from_near_zero():
    guard = DivergenceGuard(GuardConfig(kl_spike_floor=1.0, spike_factor=10.0))
    stable_history(guard, kl=1e-4)
    assert healthy(guard, 30, kl=5.0) == []  # 5e4 x the median, but under floor * factor
    assert [e.kind for e in healthy(guard, 31, kl=50.0)] == ["kl_spike"]


def test_nonfinite_values_do_not_enter_the_history():
    guard = DivergenceGuard(GuardConfig())
    stable_history(guard, steps=12)
    before = guard.state_dict()
    healthy(guard, 12, loss=NAN, kl=2.0, grad=1.0)  # loss NaN: the step is bad as a whole
    assert guard.state_dict()["kl_history"] == before["kl_history"]


def test_too_many_events_abort_with_a_one_line_error():
    cfg = GuardConfig(on_nonfinite="skip", max_events=3, event_window=10)
    guard = DivergenceGuard(cfg)
    for step in range(3):
        assert healthy(guard, step, loss=NAN)[0].action == "skip"
    with pytest.raises(DivergenceError) as raised:
        healthy(guard, 3, loss=NAN)
    message = str(raised.value)
    assert "\n" not in message and "max_events=3" in message and "nonfinite_loss" in message
    assert [e.action for e in raised.value.events] == ["abort"]


def test_old_events_leave_the_event_window():
    guard = DivergenceGuard(GuardConfig(on_nonfinite="skip", max_events=2, event_window=10))
    healthy(guard, 0, loss=NAN)
    healthy(guard, 1, loss=NAN)
    healthy(guard, 11, loss=NAN)  # step 0 and 1 fall out after 10 steps: no abort
    healthy(guard, 12, loss=NAN)
    with pytest.raises(DivergenceError):
        healthy(guard, 13, loss=NAN)


def test_several_kinds_in_one_step_count_once_and_abort_action_raises():
    guard = DivergenceGuard(GuardConfig(on_nonfinite="rollback", max_events=1, event_window=100))
    events = healthy(guard, 0, loss=NAN, kl=NAN, grad=NAN)
    assert {e.kind for e in events} == {"nonfinite_loss", "nonfinite_kl", "nonfinite_grad"}
    assert most_severe_action(events) == "rollback"
    abort_now = DivergenceGuard(GuardConfig(on_nonfinite="abort"))
    with pytest.raises(DivergenceError, match="nonfinite_grad"):
        healthy(abort_now, 0, grad=INF)


def test_scaler_skips_are_recorded_until_too_frequent():
    cfg = GuardConfig(window=10, min_history=5, scaler_skip_fraction=0.5, on_scaler_skips="lower_lr", max_events=50)
    guard = DivergenceGuard(cfg)
    actions = [healthy(guard, s, grad=INF, step_skipped_by_scaler=True)[0].action for s in range(6)]
    assert actions == ["record"] * 5 + ["lower_lr"]  # 6 > 0.5 * 10
    assert healthy(guard, 6, grad=INF, step_skipped_by_scaler=True)[0].action == "record"  # counted afresh


def test_posterior_collapse_is_reported_once_per_collapse():
    cfg = GuardConfig(collapse_kl=1e-3, collapse_steps=5)
    guard = DivergenceGuard(cfg, kl_collapse_channels=3)
    found = []
    for step in range(12):
        channel_1 = 1e-5 if step < 8 else 0.5  # collapses, then recovers at step 8
        events = healthy(guard, step, kl_per_channel=[0.5, channel_1, 1e-5 if step >= 4 else 0.5])
        found += [(e.step, e.values["channels"], e.action) for e in events]
    assert found == [(4, [1], "record"), (8, [2], "record")]
    with pytest.raises(ValueError, match="expected 3"):
        healthy(guard, 12, kl_per_channel=[0.5, 0.5])


def test_state_dict_round_trip_keeps_the_history():
    cfg = GuardConfig(kl_spike_floor=0.0, collapse_steps=30)
    guard = DivergenceGuard(cfg, kl_collapse_channels=2)
    for step in range(15):
        healthy(guard, step, kl=2.0, kl_per_channel=[1e-6, 1.0])
    healthy(guard, 15, loss=NAN)
    healthy(guard, 16, grad=INF, step_skipped_by_scaler=True)
    state = json.loads(json.dumps(guard.state_dict()))  # plain Python types only
    assert state == guard.state_dict()
    resumed = DivergenceGuard(cfg, kl_collapse_channels=2)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == guard.state_dict()
    # the resumed guard judges the next step exactly like the original
    for g in (guard, resumed):
        assert [e.kind for e in healthy(g, 17, kl=100.0, kl_per_channel=[1e-6, 1.0])] == ["kl_spike"]
    fresh = DivergenceGuard(cfg, kl_collapse_channels=2)
    assert healthy(fresh, 17, kl=100.0, kl_per_channel=[1e-6, 1.0]) == []  # no history, no spike
    with pytest.raises(ValueError, match="version"):
        fresh.load_state_dict({"version": 99})


def test_disabled_guard_reports_nothing():
    guard = DivergenceGuard(GuardConfig(enabled=False))
    assert healthy(guard, 0, loss=NAN, grad=INF) == []


def test_guard_config_is_validated():
    with pytest.raises(ConfigError, match="on_spike"):
        load_config(None, ["train.guard.on_spike=explode"])
    with pytest.raises(ConfigError, match="min_history"):
        GuardConfig(window=5, min_history=10)


def test_event_message_is_one_line_with_the_numbers():
    event = GuardEvent(step=3, kind="kl_spike", values={"kl": 123.456789, "median": 1.0}, action="rollback",
                       batch_ids=["a", "b", "c", "d"])
    assert event.message == "step 3: kl_spike (kl=123.5, median=1) -> rollback; batch: a, b, c (+1 more)"
    assert not math.isnan(event.to_dict()["values"]["kl"])
