"""mari_fx on a model sharded by TorchRec's ``DistributedModelParallel``, across processes.

``python -m torchrec_integration.sharded_check`` spawns ``--world-size`` CPU processes
(gloo on 127.0.0.1, a free port).  Each builds the same unsharded ranker, shards a copy
with user and item tables placed table-wise, column-wise and data-parallel (what
TorchRec offers on CPU), copies the unsharded weights in, traces and transforms the
sharded model, and checks that its outputs equal the unsharded, untransformed model on
the same requests for every ``--users`` count, and that user tables receive the users'
ids only (U rows).  Each rank writes what it saw to ``<out>/rank<r>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torchrec import KeyedJaggedTensor, KeyedTensor

# (key, side, dim, sharding type), user and item tables interleaved; a data-parallel table
# first, so that the sharded KeyedTensor's key order (grouped by sharding type) differs.
# Table t goes table-wise on rank t % world, column-wise over all ranks starting there.
TABLES = {
    "t_user_cat": ("user_cat", "user", 8, "data_parallel"),
    "t_item_id": ("item_id", "item", 16, "table_wise"),
    "t_user_id": ("user_id", "user", 16, "column_wise"),
    "t_item_tag": ("item_tag", "item", 16, "column_wise"),
    "t_item_cat": ("item_cat", "item", 8, "data_parallel"),
    "t_user_hist": ("user_hist", "user", 8, "table_wise"),
}
USER_KEYS = [k for k, side, _, _ in TABLES.values() if side == "user"]
ITEM_KEYS = [k for k, side, _, _ in TABLES.values() if side == "item"]
KEYS = [k for k, _, _, _ in TABLES.values()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(device=None):
    from torchrec_integration.examples import TorchRecRanker

    class TwoHeads(TorchRecRanker):
        """``over`` reads ``kt.values()`` (key order of the module that runs); ``over2``
        regroups the keys by name (order-independent)."""

        def __init__(self):
            super().__init__(tables={n: (k, s, d) for n, (k, s, d, _) in TABLES.items()}, device=device)
            self.over2 = type(self.over)(*[type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear)
                                           else type(m)() for m in self.over])

        def forward(self, user_dense: torch.Tensor, item_dense: torch.Tensor, features: KeyedJaggedTensor):
            kt = self.ebc(features)
            u = self.user_tower(user_dense)
            a = self.over(torch.cat([u, kt.values(), item_dense], dim=1))
            b = self.over2(torch.cat([u, KeyedTensor.regroup([kt], [KEYS])[0], item_dense], dim=1))
            return a.squeeze(-1), b.squeeze(-1)

    return TwoHeads()


def _copy_weights(sharded: nn.Module, ref: nn.Module, ref_keys: Sequence[str], run_keys: Sequence[str]) -> None:
    """Unsharded weights into the sharded model (each rank its shards).  ``over.0`` reads
    ``kt.values()``: its columns are permuted from ``ref_keys`` order to ``run_keys`` order,
    so the sharded model computes exactly what the unsharded one does."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    glob = dict(ref.state_dict())
    dims = {k: d for k, _, d, _ in TABLES.values()}
    tower = ref.user_tower[-2].out_features
    spans, pos = {}, tower
    for k in ref_keys:
        spans[k] = (pos, pos + dims[k])
        pos += dims[k]
    cols = list(range(tower)) + [c for k in run_keys for c in range(*spans[k])] + list(range(pos, glob["over.0.weight"].shape[1]))
    glob["over.0.weight"] = glob["over.0.weight"][:, cols]
    for name, local in sharded.state_dict().items():
        src = glob[name]
        if isinstance(local, ShardedTensor):
            for shard in local.local_shards():
                (r0, c0), (r, c) = shard.metadata.shard_offsets, shard.tensor.shape
                shard.tensor.copy_(src[r0:r0 + r, c0:c0 + c])
        else:
            local.copy_(src)


def _worker(rank: int, world_size: int, port: int, out_dir: str, users: List[int], candidates: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _check(rank, world_size, out_dir, users, candidates)
    finally:
        dist.destroy_process_group()


def _check(rank: int, world_size: int, out_dir: str, users: List[int], candidates: int) -> None:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import (column_wise, construct_module_sharding_plan, data_parallel,
                                                    table_wise)
    from torchrec.distributed.types import ShardingPlan

    import mari_fx
    import torchrec_integration  # noqa: F401  (teaches mari_fx DMP and KJTs)
    from torchrec_integration.examples import RankerBatch
    from torchrec_integration.lookups import count_lookups

    torch.manual_seed(0)  # the same reference model on every rank
    ref = _model().eval()
    meta_model = _model(device=torch.device("meta"))
    ranks = list(range(world_size))
    placement = {}
    for t, (name, (_, _, _, how)) in enumerate(TABLES.items()):
        placement[name] = (data_parallel() if how == "data_parallel" else table_wise(rank=t % world_size)
                           if how == "table_wise" else column_wise(ranks=ranks[t % world_size:] + ranks[:t % world_size]))
    plan = ShardingPlan({"ebc": construct_module_sharding_plan(meta_model.ebc, placement, local_size=world_size,
                                                               world_size=world_size, device_type="cpu")})
    dmp = DistributedModelParallel(meta_model, device=torch.device("cpu"), plan=plan)
    sharded = dmp.module.eval()
    sharding = {name: [ps.sharding_type, ps.ranks] for name, ps in plan.plan["ebc"].items()}

    batch_kw = dict(user_keys=USER_KEYS, item_keys=ITEM_KEYS, keys=KEYS)
    example = RankerBatch.random(2, 4, seed=1, **batch_kw)
    with torch.no_grad():
        ref_keys = ref.ebc(example.pairs()[2]).keys()
        run_keys = sharded.ebc(example.pairs()[2]).keys()
    _copy_weights(sharded, ref, ref_keys, run_keys)

    # the model as users hold it: the DMP itself (torchrec_integration's capture hook traces it)
    T = mari_fx.transform(dmp, ["user_dense"] + [f"features[{k}]" for k in USER_KEYS], example.pairs())
    record = T.meta["mari_fx.record"]
    results = {"rank": rank, "sharding": sharding, "ref_keys": list(ref_keys), "run_keys": list(run_keys),
               "split_layers": list(record.split_layers), "shares_sharded_ebc": T.get_submodule("ebc") is sharded.ebc,
               "requests": []}
    for u in users:
        batch = RankerBatch.random(u, candidates, seed=100 + u, **batch_kw)
        pairs = batch.pairs()
        request = mari_fx.pairs_to_request(T, *pairs, user_index=batch.user_index)
        with torch.no_grad():
            want = ref(*pairs)
            got = T(**request)
            plain = sharded(*pairs)
        for g, p, w in zip(got, plain, want):
            torch.testing.assert_close(p, w)  # the sharded model is the unsharded one
            torch.testing.assert_close(g, w)  # and so is its transform
        seen = count_lookups(T, lambda: T(**request))
        seen_pairs = count_lookups(sharded, lambda: sharded(*pairs))
        user_lengths = batch.user_kjt.lengths().view(len(USER_KEYS), u).sum(1).tolist()
        results["requests"].append({
            "users": u, "candidates": candidates,
            "max_diff": max(float((g - w).abs().max()) for g, w in zip(got, want)),
            "lookups": {k: [seen[k].ids, seen[k].rows] for k in KEYS},
            "pair_lookups": {k: [seen_pairs[k].ids, seen_pairs[k].rows] for k in KEYS},
            "user_ids": dict(zip(USER_KEYS, user_lengths)),
        })
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def run(world_size: int = 2, users: Sequence[int] = (1, 3), candidates: int = 7, out_dir: str = None) -> List[Dict]:
    """Spawn the check on ``world_size`` processes; returns each rank's results (raises if a rank failed)."""
    out_dir = out_dir or tempfile.mkdtemp(prefix="mari_fx_sharded_")
    mp.spawn(_worker, args=(world_size, free_port(), out_dir, list(users), candidates), nprocs=world_size, join=True)
    results = []
    for r in range(world_size):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--users", type=int, nargs="+", default=[1, 3])
    p.add_argument("--candidates", type=int, default=7)
    a = p.parse_args()
    t0 = time.time()
    for res in run(a.world_size, a.users, a.candidates):
        print(json.dumps(res))
    print(f"passed on {a.world_size} processes in {time.time() - t0:.1f}s")
