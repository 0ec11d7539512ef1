"""Script arguments: which data to train on and how the rewards are computed.

Field names and defaults follow open-r1's ``GRPOScriptArguments`` (itself TRL's ``ScriptArguments``
plus the reward parameters), so an open-r1 recipe's keys mean the same thing here. Where megagrpo's
default differs from open-r1's, the help says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megagrpo.config.fields import option

#: Reward functions a recipe may name in ``reward_funcs``: open-r1's math and format rewards
#: (accuracy, format, tag_count, reasoning_steps, cosine, repetition_penalty, length), its
#: soft_overlong_punishment (DAPO's) and its code rewards code_format, code and binary_code (Python
#: programs, run in megagrpo's local sandbox). open-r1's ioi_code and cf_code (C++ judged by a
#: Piston server) are not part of megagrpo.
REWARD_FUNCS = (
    "accuracy",
    "format",
    "tag_count",
    "reasoning_steps",
    "cosine",
    "repetition_penalty",
    "length",
    "soft_overlong_punishment",
    "code_format",
    "code",
    "binary_code",
)

#: open-r1's Python function names, accepted in reward_funcs for the names above.
REWARD_ALIASES = {
    "accuracy_reward": "accuracy",
    "format_reward": "format",
    "tag_count_reward": "tag_count",
    "reasoning_steps_reward": "reasoning_steps",
    "cosine_scaled_reward": "cosine",
    "repetition_penalty_reward": "repetition_penalty",
    "len_reward": "length",
    "soft_overlong_punishment_reward": "soft_overlong_punishment",
    "code_format_reward": "code_format",
    "code_reward": "code",
    "binary_code_reward": "binary_code",
}

#: The R1 system prompt (DeepSeek-R1's template, the SYSTEM_PROMPT of open-r1's first grpo.py):
#: reasoning in <think>, the final answer in <answer>.
R1_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think><answer> answer here </answer>"
)


@dataclass
class DatasetConfig:
    """One dataset of a ``dataset_mixture`` (open-r1's shape)."""

    id: str = option(help="Hub id or local path of the dataset.")
    config: str | None = option(None, help="Dataset configuration (subset) name.")
    split: str = option("train", help="Split to take the examples from.")
    columns: list[str] | None = option(
        None,
        help="Columns to keep; every dataset of a mixture must keep the same columns. None keeps "
        "all.",
    )
    weight: float = option(
        1.0,
        help="Fraction of this dataset to use, in (0, 1]: the first weight x len(dataset) rows "
        "after a shuffle with the mixture's seed (open-r1's meaning).",
    )


@dataclass
class DatasetMixtureConfig:
    """Several datasets concatenated into one training set (open-r1's ``dataset_mixture``)."""

    datasets: list[DatasetConfig] = option(help="The datasets of the mixture.")
    seed: int = option(0, help="Seed of the shuffles that take each dataset's fraction.")
    test_split_size: float | None = option(
        None, help="Fraction in (0, 1) of the mixture held out as the test split; None keeps none."
    )


@dataclass
class GRPOScriptArguments:
    """Data and reward settings of a GRPO run (open-r1's ``GRPOScriptArguments``)."""

    # ---- data ----
    dataset_name: str | None = option(
        None, help="Hub id or local path of the training dataset. Set this or dataset_mixture."
    )
    dataset_config: str | None = option(None, help="Dataset configuration (subset) name.")
    dataset_train_split: str = option("train", help="Split used for training.")
    dataset_test_split: str = option("test", help="Split used for evaluation (eval_strategy).")
    dataset_prompt_column: str = option(
        "problem",
        help="Column holding the prompt text. open-r1's field default is 'prompt'; megagrpo "
        "defaults to 'problem', the column of the math datasets open-r1's recipes use.",
    )
    dataset_solution_column: str = option(
        "solution",
        help="Column holding the reference answer, passed to the rewards as `solution`.",
    )
    dataset_mixture: DatasetMixtureConfig | None = option(
        None,
        help="A mixture of datasets instead of dataset_name, in open-r1's YAML shape: "
        "{datasets: [{id, config, split, columns, weight}, ...], seed, test_split_size}.",
    )
    on_bad_rows: Literal["error", "skip"] = option(
        "error",
        help="What a bad row does (a prompt that is not a string or a list of chat messages, a "
        "null solution where the accuracy rewards or the evaluation need one): error stops "
        "before training, naming file, row and column; skip drops such rows and counts them "
        "(printed once, logged as data/skipped_rows). Prompts over max_prompt_length follow "
        "long_prompts instead. Not in open-r1.",
    )
    dataset_streaming: bool = option(
        False,
        help="Read and tokenize the training prompts lazily, a shuffle buffer at a time, instead "
        "of loading the whole dataset first (TRL's key): local JSON Lines (.jsonl) and Parquet "
        "files, directories of them, and mixtures of those. The order is a seeded buffered "
        "shuffle (dataset_shuffle_buffer_size rows); a resumed run continues from the exact data "
        "position saved in the checkpoint. Needs max_steps (the number of prompts is not known "
        "before a pass over the data); rows are checked when read, so with on_bad_rows: error a "
        "bad row stops the run when it is reached. See docs/config.md.",
    )
    dataset_shuffle_buffer_size: int = option(
        10_000,
        help="dataset_streaming only: rows per shuffle buffer. Each epoch visits the buffers in "
        "a seeded order and each buffer's rows in a seeded order; memory holds one buffer of "
        "rows (untokenized). Not in TRL.",
    )

    # ---- rewards ----
    reward_funcs: list[str] = option(
        ["accuracy", "format"],
        help="Reward functions to combine, from: " + ", ".join(REWARD_FUNCS) + ". Defaults to the "
        "pair of open-r1's first grpo.py, accuracy + format (its default now adds tag_count).",
    )
    reward_weights: list[float] | None = option(
        None,
        help="One weight per reward function (same order); None weights every function 1.0. "
        "TRL keeps this field in GRPOConfig; the recipe key is the same.",
    )
    cosine_min_value_wrong: float = option(
        0.0, help="Cosine-scaled reward of a wrong answer at length 0."
    )
    cosine_max_value_wrong: float = option(
        -0.5, help="Cosine-scaled reward of a wrong answer at cosine_max_len."
    )
    cosine_min_value_correct: float = option(
        0.5, help="Cosine-scaled reward of a correct answer at cosine_max_len."
    )
    cosine_max_value_correct: float = option(
        1.0, help="Cosine-scaled reward of a correct answer at length 0."
    )
    cosine_max_len: int = option(
        1000, help="Completion length at which the cosine scaling reaches its end value."
    )
    repetition_n_grams: int = option(3, help="n-gram size of the repetition penalty reward.")
    repetition_max_penalty: float = option(
        -1.0, help="Penalty (<= 0) of a completion made only of repeated n-grams."
    )
    repetition_language: Literal["en", "zh"] = option(
        "en",
        help="How the repetition penalty splits text into words: en on whitespace, zh into "
        "Chinese words with jieba (open-r1's get_repetition_penalty_reward language argument, "
        "which its recipes cannot set).",
    )
    code_language: str = option(
        "python",
        help="Language of the fenced code block (```python) the code_format reward asks for in "
        "the answer.",
    )
    code_provider: Literal["local", "e2b", "morph"] = option(
        "local",
        help="Where the code and binary_code rewards run programs: local, megagrpo's sandbox "
        "(docs/rewards.md). e2b and morph (remote sandboxes) are refused. open-r1's default is "
        "e2b.",
    )
    code_eval_scoring_mode: Literal["partial", "pass_fail", "weighted_sum"] = option(
        "partial",
        help="Score of the code reward: partial, the fraction of test cases passed (open-r1's "
        "code reward); pass_fail, 1 if all pass; weighted_sum, pass_fail + 0.1 x fraction. "
        "open-r1's default, weighted_sum, is read by its cf_code reward only. binary_code is "
        "always pass_fail.",
    )
    code_eval_test_batch_size: int = option(
        1,
        help="Test cases of a program run at once, each in its own sandbox process (< 1: all). "
        "After a batch with a failure, pass_fail scoring (and binary_code) stops.",
    )
    code_timeout_seconds: float = option(
        5.0,
        help="Wall time of one program run on one test case; past it the run is killed and the "
        "test fails. The pool's reward_timeout_seconds bounds all the test cases of a sample.",
    )
    code_cpu_seconds: int = option(
        5, help="CPU time (RLIMIT_CPU) of one program run on one test case."
    )
    code_memory_mb: int = option(512, help="Address space (RLIMIT_AS) of one program run, in MiB.")
    code_max_output_bytes: int = option(
        1048576, help="Most stdout bytes of one program run; past it the run is killed."
    )
    code_sandbox_strict: bool = option(
        True,
        help="Refuse to run programs unless this machine gives the sandbox user, PID and "
        "network namespaces, Landlock and seccomp; false runs them with what there is "
        "(docs/rewards.md says what is then not guaranteed).",
    )
    max_completion_len: int = option(
        16384,
        help="L_max of DAPO's soft overlong punishment, in completion tokens: longer completions "
        "get -1.",
    )
    soft_punish_cache: int = option(
        4096,
        help="L_cache of DAPO's soft overlong punishment: the penalty ramps linearly from 0 to -1 "
        "over the last soft_punish_cache tokens before max_completion_len.",
    )
    reward_timeout_seconds: float = option(
        10.0,
        help="Hard time limit of one reward call in a worker process; a call past it is killed and "
        "scores None (NaN), and the worker is replaced.",
    )
    num_reward_workers: int = option(
        4, help="Number of reward worker processes (each scores one sample at a time)."
    )
