"""Server mode with real vLLM (CPU build): a trainer and two ``megagrpo rollout-server --engine
vllm`` processes spawned by the pool."""

from __future__ import annotations

import pytest
from _multiproc import run_ranks
from _vllm_workers import server_pool_worker


@pytest.fixture(scope="module")
def result(tiny_checkpoint, tmp_path_factory):
    logs = str(tmp_path_factory.mktemp("vllm-servers"))
    return run_ranks(1, server_pool_worker, tiny_checkpoint("qwen2-demo"), logs, timeout=560)[0]


def test_weights_reach_every_server_bit_for_bit(result):
    assert result["num_tensors"] == 50  # the demo model ties its LM head to the embedding
    assert result["digests_equal"] == [True, True]


def test_the_pools_vllm_settings_reach_the_servers(result):
    assert result["flags_reached_vllm"] == [True] * 4


def test_servers_sample_from_the_trainers_policy(result):
    assert result["versions"] == [1]
    assert result["gap"] <= 1e-4


def test_a_server_killed_mid_batch_is_restarted_and_the_batch_completes(result):
    assert result["restarts"] == 1 and result["new_pid"] and result["old_gone"]
    # seeded groups: the batch is the one an undisturbed pool returns
    assert result["batch_equal"]
    assert result["versions_after"] == [1]
    assert result["digests_after_restart"] == [True, True]
    assert result["servers_left"] == []
    assert result["group_members_left"] == []  # vLLM's engine-core / worker processes too
