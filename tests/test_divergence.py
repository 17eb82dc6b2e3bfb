"""The divergence guard's rules (pretrain/faults/divergence.py) and the straggler arithmetic
(pretrain/faults/stragglers.py), without training; tests/test_faults.py injects the faults
into real runs."""

import math

import pytest

from pretrain.config import FaultsConfig
from pretrain.faults.divergence import Diverged, DivergenceGuard, spike_threshold
from pretrain.faults.stragglers import slow_ranks


def feed(guard, losses):
    problems = []
    for loss in losses:
        problem = guard.loss_problem(loss)
        guard.record(loss, problem)
        problems.append(problem)
    return problems


def test_non_finite_values_are_bad_from_the_first_step():
    guard = DivergenceGuard(FaultsConfig(spike_window=50))
    assert guard.loss_problem(math.nan) == "loss is nan"
    assert guard.loss_problem(math.inf) == "loss is inf"
    assert guard.norm_problem(math.nan) == "gradient norm is nan"
    assert guard.loss_problem(8.0) is None and guard.norm_problem(3.0) is None


def test_spike_rule_waits_for_a_full_window_then_flags_only_real_jumps():
    guard = DivergenceGuard(FaultsConfig(spike_window=4, spike_sigmas=3.0, spike_min_increase=0.1))
    # Early in training the loss falls fast; nothing is judged until the window is full.
    assert feed(guard, [10.0, 9.0, 30.0, 8.0]) == [None] * 4
    window = [10.0, 9.0, 30.0, 8.0]
    assert spike_threshold(window, sigmas=3.0, min_increase=0.1) == pytest.approx(
        14.25 + 3 * math.sqrt(sum((x - 14.25) ** 2 for x in window) / 4)
    )
    guard = DivergenceGuard(FaultsConfig(spike_window=4, spike_sigmas=3.0, spike_min_increase=0.1))
    feed(guard, [4.0, 4.02, 3.98, 4.0])  # std 0.014: 3 sigma would be 4.04
    assert guard.loss_problem(4.3) is None  # below the 10 % floor (4.4): ordinary noise late in training
    problem = guard.loss_problem(4.5)
    assert problem.startswith("loss spike: 4.5000 above 4.4000")
    guard.record(4.5, problem)
    assert list(guard.history) == [4.0, 4.02, 3.98, 4.0]  # a bad step does not join the history
    off = DivergenceGuard(FaultsConfig(spike_window=2, spike_sigmas=0))
    feed(off, [1.0, 1.0])
    assert off.loss_problem(100.0) is None  # spike detection off; non-finite still caught
    assert off.loss_problem(math.nan) is not None


def test_consecutive_bad_steps_ask_for_a_rollback_and_rollbacks_run_out():
    guard = DivergenceGuard(FaultsConfig(max_bad_steps=3, max_rollbacks=1))
    feed(guard, [math.nan, math.nan, 5.0, math.nan, math.nan])  # a good step resets the count
    assert not guard.must_roll_back() and guard.skipped_total == 4
    feed(guard, [math.nan])
    assert guard.must_roll_back()
    guard.start_rollback("loss is nan")
    assert guard.rollbacks == 1 and guard.consecutive_bad == 0
    feed(guard, [math.inf] * 3)
    with pytest.raises(Diverged, match="faults.max_rollbacks=1"):
        guard.start_rollback("loss is inf")


def test_state_round_trips_and_a_rollback_keeps_its_count():
    guard = DivergenceGuard(FaultsConfig(spike_window=3, max_rollbacks=5))
    feed(guard, [3.0, 2.0, math.nan])
    saved = guard.state_dict()
    assert saved == {"history": [3.0, 2.0], "skipped_total": 1, "rollbacks": 0}
    guard.start_rollback("x")
    guard.start_rollback("y")
    guard.load_state_dict(saved, keep_rollbacks=True)  # what a rollback does
    assert guard.rollbacks == 2 and list(guard.history) == [3.0, 2.0]
    fresh = DivergenceGuard(FaultsConfig(spike_window=3))
    fresh.load_state_dict({**saved, "rollbacks": 2})  # what a resume does
    assert fresh.rollbacks == 2 and fresh.skipped_total == 1


def test_slow_ranks_are_those_above_factor_times_the_median():
    hosts = ["a", "a", "b", "b"]
    slow = slow_ranks([1.0, 1.1, 0.9, 2.5], hosts=hosts, factor=1.5)
    assert slow == [{"rank": 3, "host": "b", "own_work_s": 2.5, "median_s": 1.05, "ratio": 2.38}]
    assert slow_ranks([1.0, 1.2, 1.4], hosts=hosts, factor=1.5) == []
    assert slow_ranks([0.0, 0.0], hosts=hosts, factor=1.5) == []


def test_faults_section_validates_itself():
    from pretrain.config import ConfigError, config_from_dict

    for bad, key in [
        ("faults.spike_window=0", "faults.spike_window"),
        ("faults.max_bad_steps=0", "faults.max_bad_steps"),
        ("faults.straggler_factor=1.0", "faults.straggler_factor"),
        ("faults.max_rollbacks=-1", "faults.max_rollbacks"),
    ]:
        with pytest.raises(ConfigError, match=key):
            config_from_dict({}, [bad])
