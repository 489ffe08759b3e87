"""FlatLayout properties over random shapes, bucket sizes and world sizes (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroadamw.layout import BucketLayout, plan_buckets

numels = st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=25)


@settings(max_examples=300, deadline=None)
@given(numels=numels, bucket_size=st.integers(1, 1000), world=st.integers(1, 9))
def test_every_element_owned_exactly_once(numels, bucket_size, world):
    buckets = plan_buckets(numels, bucket_size)
    # buckets partition the params, in order, and never split one
    assert [i for b in buckets for i in b] == list(range(len(numels)))
    for b in buckets:
        size = sum(numels[i] for i in b)
        assert size <= bucket_size or len(b) == 1
        owners = torch.zeros(size, dtype=torch.int64)
        layouts = [BucketLayout([numels[i] for i in b], world, r) for r in range(world)]
        for r, lay in enumerate(layouts):
            assert lay.padded % world == 0 and 0 <= lay.padding < world
            assert lay.shard * world == lay.padded
            seen_shard = 0
            for s in lay.slots:
                if s.owned:
                    # the owned part of a param is inside the rank's range, and packs contiguously into its shard
                    lo, hi = lay.owner_range(r)
                    assert lo <= s.offset + s.own_lo and s.offset + s.own_hi <= hi
                    assert s.shard_lo == s.offset + s.own_lo - lo
                    assert s.shard_lo == seen_shard
                    seen_shard += s.owned
                    owners[s.offset + s.own_lo : s.offset + s.own_hi] += 1
        assert torch.all(owners == 1), "an element is owned by zero or several ranks"


@settings(max_examples=100, deadline=None)
@given(numels=numels, world=st.integers(1, 6))
def test_views_alias_the_right_storage(numels, world):
    """Writing a distinct value through each rank's per-param views of its shard and all-gathering (here:
    concatenating the shards) reassembles every parameter exactly."""
    params = [torch.arange(n, dtype=torch.float64) + 1000 * i for i, n in enumerate(numels)]
    layouts = [BucketLayout(numels, world, r) for r in range(world)]
    shards = []
    for lay in layouts:
        shard = torch.full((lay.shard,), -1.0, dtype=torch.float64)
        for s in lay.slots:
            view = shard[s.shard_lo : s.shard_lo + s.owned]
            view.copy_(params[s.index][s.own_lo : s.own_hi])  # writes go to the shard storage
            assert view.data_ptr() == shard.data_ptr() + s.shard_lo * shard.element_size() or s.owned == 0
        shards.append(shard)
    full = torch.cat(shards)
    for s, p in zip(layouts[0].slots, params):
        assert torch.equal(full[s.offset : s.offset + s.numel], p)
    assert torch.all(full[layouts[0].numel :] == -1.0)  # padding untouched


def test_bad_arguments():
    with pytest.raises(ValueError, match="bucket_size"):
        plan_buckets([3], 0)
    with pytest.raises(ValueError, match="rank"):
        BucketLayout([3], 2, 2)
    with pytest.raises(ValueError, match="at least one"):
        BucketLayout([], 2, 0)


def test_big_param_gets_its_own_bucket():
    assert plan_buckets([5, 100, 5, 5], 20) == [[0], [1], [2, 3]]
