"""Registry (names, aliases, weights, dotted paths, config errors), serial scorer and metrics."""

from __future__ import annotations

import math

import pytest
import torch

from megagrpo.config.script_args import REWARD_FUNCS, GRPOScriptArguments
from megagrpo.rewards.calls import ERROR, NONE, SCORED
from megagrpo.rewards.metrics import reward_metrics
from megagrpo.rewards.registry import ALIASES, build_reward_functions, reward_function
from megagrpo.rewards.scores import make_scores, score_serial

R1_OK = "<think>\nStep 1: 6*7.\n</think>\n<answer>\n$\\boxed{42}$\n</answer>"


def test_every_recipe_name_and_alias_builds():
    fns = build_reward_functions(GRPOScriptArguments(reward_funcs=list(REWARD_FUNCS)))
    assert [f.name for f in fns] == [
        "accuracy_reward",
        "format_reward",
        "tag_count_reward",
        "reasoning_steps_reward",
        "cosine_scaled_reward",
        "repetition_penalty_reward",
        "len_reward",
        "soft_overlong_punishment_reward",
        "code_format_reward",
        "code_reward",
        "binary_code_reward",
    ]
    aliases = build_reward_functions(GRPOScriptArguments(reward_funcs=list(ALIASES)))
    assert [f.name for f in aliases] == [f.name for f in fns]
    assert [f.hang_group for f in fns] == [
        "math_verify",
        None,
        None,
        None,
        "math_verify",
        None,
        "math_verify",
        None,
        None,
        None,
        None,
    ]


def test_script_args_parameters_reach_the_factories():
    s = GRPOScriptArguments(
        reward_funcs=["cosine", "repetition_penalty", "soft_overlong_punishment"],
        reward_weights=[2.0, 0.5, 1.0],
        cosine_max_len=10,
        cosine_min_value_correct=0.0,
        repetition_n_grams=1,
        repetition_max_penalty=-2.0,
        max_completion_len=8,
        soft_punish_cache=4,
    )
    cos, rep, over = build_reward_functions(s)
    assert (cos.weight, rep.weight, over.weight) == (2.0, 0.5, 1.0)
    assert cos.kwargs["max_len"] == 10
    ids = [[0] * 5]
    # correct at half of max_len: 0 + 0.5 * (1 - 0) * (1 + cos(pi/2)) = 0.5
    assert cos(["$\\boxed{1}$"], solution=["1"], completion_ids=ids) == [pytest.approx(0.5)]
    assert rep(["a a b b"]) == [pytest.approx(-2.0 * (1 - 2 / 4))]
    assert over(["x"], completion_ids=[[0] * 6]) == [pytest.approx(-0.5)]


def test_custom_dotted_path():
    fn = reward_function("_reward_fns:constant_half", weight=3.0)
    assert (fn.name, fn.weight, fn.hang_group) == ("constant_half", 3.0, None)
    assert fn(["a", "b"]) == [0.5, 0.5]
    assert reward_function("_reward_fns.constant_half").name == "constant_half"


@pytest.mark.parametrize(
    "funcs,weights,match",
    [
        (
            ["accuracy", "nonsense"],
            None,
            "'nonsense' is not a reward function: choose from accuracy",
        ),
        ([], None, "reward_funcs is empty"),
        (["accuracy", "accuracy_reward"], None, "name accuracy_reward more than once"),
        (["accuracy", "format"], [1.0], "reward_weights has 1 entries"),
        (["accuracy"], [float("inf")], "every weight must be a finite number"),
        (["_reward_fns:missing"], None, "has no attribute 'missing'"),
        (["_no_such_module:fn"], None, "cannot import module '_no_such_module'"),
        (["_reward_fns:NOT_CALLABLE"], None, "is not callable"),
    ],
)
def test_bad_reward_config(funcs, weights, match):
    with pytest.raises(ValueError, match=match):
        build_reward_functions(GRPOScriptArguments(reward_funcs=funcs, reward_weights=weights))


def test_repetition_positive_penalty_is_a_config_error():
    s = GRPOScriptArguments(reward_funcs=["repetition_penalty"], repetition_max_penalty=0.1)
    with pytest.raises(ValueError, match="repetition_max_penalty=0.1 must be <= 0"):
        build_reward_functions(s)


def test_serial_scores_attribute_failures():
    fns = [
        reward_function("accuracy"),
        reward_function("_reward_fns:adversarial"),
        reward_function("_reward_fns:none_for_odd_lengths"),
        reward_function("_reward_fns:wrong_length"),
    ]
    comps = [R1_OK, "RAISE", "abc"]
    scores = score_serial(fns, comps, {"solution": ["42", "42", "bad gold"]})
    r = scores.rewards_nk
    assert r.dtype == torch.float64 and r.shape == (3, 4)
    assert len(R1_OK) == 61  # odd: none_for_odd_lengths answers None
    assert r[0, :2].tolist() == [1.0, 61.0] and r[1, 0] == 0.0 and r[2, 1] == 3.0
    assert scores.status_nk.tolist() == [
        [SCORED, SCORED, NONE, ERROR],
        [SCORED, ERROR, NONE, ERROR],
        [NONE, SCORED, NONE, ERROR],  # row 2: unparseable gold -> None
    ]
    assert torch.isnan(r[scores.status_nk != SCORED]).all()
    assert (scores.errors, scores.nones) == (4, 4)
    assert any("adversarial on sample 1: RuntimeError" in m for m in scores.error_messages)
    assert any("wrong_length" in m and "4 values for 3" in m for m in scores.error_messages)
    with pytest.raises(ValueError, match="column 'solution' has 2 entries for 3 completions"):
        score_serial(fns, comps, {"solution": ["1", "2"]})
    with pytest.raises(ValueError, match="3 completions are not whole groups of num_generations=2"):
        score_serial(fns, comps, {"solution": ["1"] * 3}, num_generations=2)


def test_serial_len_groups_by_num_generations():
    fns = build_reward_functions(GRPOScriptArguments(reward_funcs=["length"]))
    comps = ["$\\boxed{1}$"] * 4
    ids = [[0] * 10, [0] * 20, [0] * 100, [0] * 300]
    by_group = score_serial(fns, comps, {"solution": ["1"] * 4, "completion_ids": ids}, 2)
    assert by_group.rewards_nk[:, 0].tolist() == [0.5, -0.5, 0.5, -0.5]


def test_metrics_hand_computed():
    nan = float("nan")
    # N = 4 (2 groups of 2), K = 2, weights (1, 2)
    values = [[1.0, 0.5], [0.0, nan], [nan, nan], [1.0, 1.0]]
    status = [[SCORED, SCORED], [SCORED, NONE], [NONE, NONE], [SCORED, SCORED]]

    class F:
        def __init__(self, name, weight):
            self.name, self.weight = name, weight

    scores = make_scores([F("a", 1.0), F("b", 2.0)], values, status, 1.25, 1, [])
    m = reward_metrics(scores, num_generations=2)
    assert m["rewards/a/mean"] == pytest.approx(2 / 3)
    assert m["rewards/a/std"] == pytest.approx(math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2))
    assert m["rewards/b/mean"] == pytest.approx(0.75)
    assert m["rewards/b/std"] == pytest.approx(math.sqrt(2 * 0.25**2))
    # totals: 2.0, 0.0, NaN, 3.0 -> mean 5/3; group stds: std(2, 0) = sqrt(2), one member -> 0
    assert scores.total_n()[2].isnan()
    assert m["reward"] == pytest.approx(5 / 3)
    assert m["reward_std"] == pytest.approx(math.sqrt(2) / 2)
    assert m["frac_reward_zero_std"] == 0.5
    assert (m["rewards/nones"], m["rewards/timeouts"], m["rewards/restarts"]) == (3.0, 0.0, 1.0)
    assert m["rewards/scoring_seconds"] == 1.25
    one = reward_metrics(make_scores([F("a", 1.0)], [[nan]], [[NONE]], 0.0, 0, []))
    assert math.isnan(one["rewards/a/mean"]) and math.isnan(one["reward"])
