import pytest

from runtime.core.lifecycle import TERMINAL, InstanceEvent, InstanceState, InvalidTransition, transition

S, E = InstanceState, InstanceEvent


@pytest.mark.parametrize(
    "state,event,expected",
    [
        (S.LOADING, E.LOADED, S.READY),
        (S.LOADING, E.FAILED, S.FAILED),
        (S.READY, E.DRAIN, S.DRAINING),
        (S.READY, E.EVICT, S.EVICTED),
        (S.DRAINING, E.DRAINED, S.UNLOADED),
        (S.DRAINING, E.EVICT, S.EVICTED),
    ],
)
def test_allowed_transitions(state, event, expected):
    assert transition(state, event) is expected


@pytest.mark.parametrize("state", sorted(TERMINAL, key=lambda s: s.value))
def test_terminal_states_take_no_event(state):
    for event in E:
        with pytest.raises(InvalidTransition, match=state.value):
            transition(state, event)


def test_loading_cannot_be_drained():
    with pytest.raises(InvalidTransition):
        transition(S.LOADING, E.DRAIN)
