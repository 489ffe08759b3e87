"""zeroadamw.comm: the point-to-point reduce-scatter and all-gather on gloo (and the other modes) against a
reference all-reduce, with their byte counts."""

import pytest

import comm_workers
from distributed import run


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_every_mode_matches_the_all_reduce_and_counts_ring_bytes(world_size):
    res = run(comm_workers.collectives_match_reference, world_size, "float32")
    n = world_size
    padded = sum(n * c * 4 for c in (1, 5, 64, 1000))
    for (rs_mode, ag_mode), c in res[0].items():
        ag = c["all_gather"]["bytes"]
        assert abs(ag - 2 * (n - 1) / n * padded) <= 8, (rs_mode, ag_mode, c)  # two all-gathers of each size
        if rs_mode == "allreduce":
            assert abs(c["all_reduce"]["bytes"] - 2 * (n - 1) / n * padded) <= 8 and "reduce_scatter" not in c
        else:  # a real reduce-scatter: half the all-reduce's bytes, what DDP's all-reduce splits into
            assert abs(c["reduce_scatter"]["bytes"] - (n - 1) / n * padded) <= 4 and "all_reduce" not in c


def test_bf16_p2p_collectives():
    run(comm_workers.collectives_match_reference, 3, "bfloat16")


def test_p2p_on_a_subgroup_interleaved_with_the_world_group():
    assert all(run(comm_workers.subgroup_and_interleaving, 4))


def test_too_small_scratch_is_refused():
    msgs = run(comm_workers.scratch_is_checked, 3)  # N = 3: one chunk of scratch (N = 2 needs none)
    assert all(m and "scratch must hold 8" in m for m in msgs)
