"""utils/privacy_record.py: one typed record, rounded-up printing, resume compatibility, JSON round trip."""

import math

import pytest

from utils.privacy_record import PrivacyRecord, format_delta, format_epsilon, replace_one_epsilon


def record(**overrides):
    values = dict(
        dp_enabled=True,
        target_epsilon=3.0,
        delta=1e-5,
        noise_multiplier=0.6,
        sample_rate=16 / 468,
        max_grad_norm=1.0,
        expected_batch_size=16,
        planned_steps=10,
        accountant="prv",
        n_train=468,
        secure_mode=False,
        accountant_history=[(0.6, 16 / 468, 10)],
        steps_taken=10,
        epsilon=2.99392,
    )
    values.update(overrides)
    return PrivacyRecord(**values)


@pytest.mark.parametrize(
    "value, text",
    [
        (2.99392, "3.00"),
        (3.0, "3.00"),
        (2.001, "2.01"),
        (7.9935, "8.00"),
        (0.00999, "0.01"),
        (1.0, "1.00"),
        (math.inf, "inf"),
        (None, "?"),
    ],
)
def test_format_epsilon_rounds_up_never_down(value, text):
    assert format_epsilon(value) == text
    if value is not None and math.isfinite(value):
        assert float(text) >= value


@pytest.mark.parametrize(
    "value, text",
    [(1e-5, "1e-05"), (1.0000001e-5, "1.01e-05"), (1 / 4680, "0.000214"), (2.1367e-6, "2.14e-06")],
)
def test_format_delta_rounds_up_to_three_digits(value, text):
    assert format_delta(value) == text and float(text) >= value


def test_guarantee_line_states_relation_accountant_and_threat_model():
    assert record().guarantee_line() == (
        "DP-trained: epsilon <= 3.00, delta = 1e-05 (add/remove one row; prv accountant; "
        "seeded: holds only against someone who does not know the seed)"
    )
    assert "secure randomness" in record(secure_mode=True).guarantee_line()
    assert record(dp_enabled=False).guarantee_line() == "NO privacy guarantee (trained with --disable_dp)"
    assert "forked" in record(forks=1, epsilon_with_forks=4.2).guarantee_line()


def test_json_round_trip_keeps_every_field():
    original = record(
        lineage=[{"resumed_at_step": 4, "secure_mode": False}], split={"seed": 0, "test_fraction": 0.05}
    )
    again = PrivacyRecord.from_json(original.to_json())
    assert again == original
    assert original.to_json()["dp_event"]["events"][0]["count"] == 10


def test_non_private_record_makes_no_epsilon_or_delta_claim():
    data = record(dp_enabled=False).to_json()
    assert (
        data["epsilon"] is None
        and data["delta"] is None
        and data["target_epsilon"] is None
        and "dp_event" not in data
    )


def test_compatible_with_names_every_differing_mechanism_parameter():
    assert record().compatible_with(record()) == []
    problems = record().compatible_with(record(secure_mode=True, noise_multiplier=0.7))
    assert [p.split(":")[0] for p in problems] == ["noise_multiplier", "secure_mode"]


def test_replace_one_epsilon_is_at_least_the_add_remove_one():
    from utils import privacy

    history = [(0.6, 16 / 468, 10)]
    add_remove = privacy.epsilon_after(10, 0.6, 16 / 468, 1e-5, "prv")
    # replace-one neighbours are two add/remove steps apart: its epsilon is larger (at most about twice)
    assert add_remove < replace_one_epsilon(history, 1e-5) <= 2 * add_remove + 0.05
