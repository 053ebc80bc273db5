"""The job state table: every state reachable, terminal states restartable, bad moves rejected."""

from __future__ import annotations

import pytest

from supervisor.core.states import TERMINAL_STATES, TRANSITIONS, JobState, TransitionError, check_transition


class TestTable:
    """The allowed-transitions table is complete and walkable."""

    def test_every_state_has_a_row(self) -> None:
        assert set(TRANSITIONS) == set(JobState)

    def test_every_state_is_reachable_from_stopped(self) -> None:
        seen, frontier = {JobState.STOPPED}, [JobState.STOPPED]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert seen == set(JobState)

    def test_terminal_states_can_only_start_again(self) -> None:
        for state in TERMINAL_STATES:
            assert TRANSITIONS[state] <= {JobState.STARTING}

    @pytest.mark.parametrize(("old", "new"), [(JobState.STOPPED, JobState.RUNNING),
                                              (JobState.FINISHED, JobState.FATAL),
                                              (JobState.BACKOFF, JobState.RUNNING)])
    def test_disallowed_transition_raises(self, old: JobState, new: JobState) -> None:
        with pytest.raises(TransitionError, match=f"{old.name} cannot go to {new.name}"):
            check_transition(old, new)
