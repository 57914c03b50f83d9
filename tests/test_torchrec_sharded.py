"""mari_fx on a DistributedModelParallel model: 2 CPU processes, gloo, table-wise / column-wise /
data-parallel tables (see torchrec_integration/sharded_check.py)."""
import pytest

from torchrec_integration import sharded_check


@pytest.mark.slow
def test_sharded_model_transformed_on_each_rank_matches_unsharded():
    results = sharded_check.run(world_size=2, users=(1, 3), candidates=7)  # raises if a rank failed
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        kinds = {how for how, _ranks in r["sharding"].values()}
        assert kinds == {"table_wise", "column_wise", "data_parallel"}
        assert any(len(ranks) == 2 for how, ranks in r["sharding"].values() if how == "column_wise")
        # the sharded KeyedTensor orders keys by sharding type: the split read it from the module run
        assert r["run_keys"] != r["ref_keys"] and sorted(r["run_keys"]) == sorted(r["ref_keys"])
        assert r["split_layers"] == ["over.0", "over2.0"]
        assert r["shares_sharded_ebc"]  # mari_fx.transform(dmp) calls the DMP's own sharded EBC
        assert [q["users"] for q in r["requests"]] == [1, 3]
        for q in r["requests"]:
            assert q["max_diff"] < 1e-5
            for key in sharded_check.USER_KEYS:  # user tables: the U users' ids, in rows [:U]
                ids, rows = q["lookups"][key]
                assert ids == q["user_ids"][key] and rows <= q["users"]
            assert q["lookups"]["user_id"][1] == q["users"]
            assert q["pair_lookups"]["user_id"][1] == q["candidates"]
            for key in sharded_check.ITEM_KEYS:
                assert q["lookups"][key] == q["pair_lookups"][key]
