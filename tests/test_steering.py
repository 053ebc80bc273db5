"""The conformance kit's steering variables as the Python SDK reads them (docs/PROTOCOL.md section 9)."""

from __future__ import annotations

import pytest

from worker.session import Session
from worker.steering import Steering


class TestSteering:
    """Unset asks for nothing; values parse by their type; a bad value is an error naming the variable."""

    def test_unset_or_empty_asks_for_nothing(self) -> None:
        assert Steering.from_env({}) == Steering.from_env({"MLXSUP_CONFORMANCE_SLOW_EVERY": ""}) == Steering()
        assert not any(Steering().slow(step) for step in range(1, 100))

    def test_values_and_the_slow_steps(self) -> None:
        steering = Steering.from_env({"MLXSUP_CONFORMANCE_LOAD_SECONDS": "2.5", "MLXSUP_CONFORMANCE_SLOW_EVERY": "20",
                                      "MLXSUP_CONFORMANCE_SLOW_SECONDS": "30"})
        assert (steering.load_seconds, steering.slow_every, steering.slow_seconds) == (2.5, 20, 30.0)
        assert [step for step in range(1, 61) if steering.slow(step)] == [20, 40, 60]

    @pytest.mark.parametrize(("name", "value"), [("MLXSUP_CONFORMANCE_SLOW_EVERY", "2.5"),
                                                 ("MLXSUP_CONFORMANCE_LOAD_SECONDS", "soon"),
                                                 ("MLXSUP_CONFORMANCE_SLOW_SECONDS", "-1")])
    def test_a_bad_value_names_the_variable(self, name: str, value: str) -> None:
        with pytest.raises(ValueError, match=f"{name}='{value}'"):
            Steering.from_env({name: value})

    def test_a_session_refuses_a_bad_value(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("MLXSUP_ENDPOINT", raising=False)
        monkeypatch.setenv("MLXSUP_CONFORMANCE_SLOW_EVERY", "often")
        with pytest.raises(ValueError, match="MLXSUP_CONFORMANCE_SLOW_EVERY='often' is not a valid int"):
            Session.from_env(target_steps=10, batch=4)
