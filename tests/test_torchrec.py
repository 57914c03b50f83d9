"""mari_fx on TorchRec models: KJT inputs, embedding collections, KeyedTensor accessors."""
import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchrec.fx
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

import mari_fx
import torchrec_integration as tri
from mari_fx.testing.examples import mlp
from mari_fx.runtime.modules import SplitLinear
from mari_fx.analysis.tags import ROWS_KEY, TAG_KEY
from torchrec_integration import jagged
from torchrec_integration.examples import ITEM_KEYS, TABLES, USER_KEYS, RankerBatch, SequenceRanker, TorchRecRanker, random_kjt
from torchrec_integration.lookups import count_lookups

SHAPES = [(1, 1), (1, 7), (3, 7), (3, 3), (2, 20)]
SELECTORS = ["user_dense"] + [f"features[{k}]" for k in USER_KEYS]


def transform(model, **kw):
    return mari_fx.transform(model, SELECTORS, RankerBatch.random(2, 4, seed=1).pairs(), **kw)


def run(T, model, batch):
    pairs = batch.pairs()
    request = mari_fx.pairs_to_request(T, *pairs, user_index=batch.user_index)
    with torch.no_grad():
        return T(**request), model(*pairs), request


def columns(keys):
    """Columns of the over-arch input [tower 16 | pooled keys in table order | item dense 4] that ``keys`` hold."""
    out, pos = [], 16
    for key, _, dim in TABLES.values():
        if key in keys:
            out += range(pos, pos + dim)
        pos += dim
    return out


@pytest.mark.parametrize("head", ["values", "regroup", "dict"])
@pytest.mark.parametrize("U,N", SHAPES)
def test_ranker_interleaved_keys_split_like_neat_layout(head, U, N):
    model = TorchRecRanker(head=head).eval()
    T = transform(model)
    T.graph.lint()
    got, want, request = run(T, model, RankerBatch.random(U, N, seed=U * 10 + N))
    torch.testing.assert_close(got, want)
    assert request["features_user"].stride() == U and request["features_item"].stride() == N
    record = T.meta["mari_fx.record"]
    assert record.split_layers == ("over.0",)
    assert {"user_tower.0", "user_tower.2"} <= set(record.hoisted)
    # user keys' columns (interleaved with item keys in table order) go to the user block
    split, orig = T.get_submodule("over.0"), model.over[0]
    assert isinstance(split, SplitLinear)
    torch.testing.assert_close(split.weight_user, orig.weight[:, list(range(16)) + columns(USER_KEYS)])
    torch.testing.assert_close(split.weight_item, orig.weight[:, columns(ITEM_KEYS) + list(range(64, 68))])


def test_flops_reach_the_analytic_minimum():
    model = TorchRecRanker().eval()
    T = transform(model)
    U, N = 2, 50
    batch = RankerBatch.random(U, N)
    pairs = batch.pairs()
    request = mari_fx.pairs_to_request(T, *pairs, user_index=batch.user_index)
    tower = [m for m in model.user_tower if isinstance(m, nn.Linear)]
    first, *rest = [m for m in model.over if isinstance(m, nn.Linear)]
    user_cols = 16 + len(columns(USER_KEYS))
    minimum = (sum(2 * U * m.in_features * m.out_features for m in tower)
               + 2 * first.out_features * (U * user_cols + N * (first.in_features - user_cols))
               + sum(2 * N * m.in_features * m.out_features for m in rest))
    assert mari_fx.count_flops(T, **request) == minimum < mari_fx.count_flops(model, *pairs)


def _table_ids(module, call):
    """Ids each table's nn.EmbeddingBag receives during ``call()``."""
    seen, hooks = {}, []
    for name, bag in module.ebc.embedding_bags.items():
        def hook(_m, args, kwargs, name=name):
            seen[name] = seen.get(name, 0) + (args[0] if args else kwargs["input"]).numel()
        hooks.append(bag.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("U,N", [(1, 9), (3, 9)])
def test_user_tables_receive_U_rows(U, N):
    model = TorchRecRanker().eval()
    T = transform(model)
    batch = RankerBatch.random(U, N, seed=3)
    pairs = batch.pairs()
    request = mari_fx.pairs_to_request(T, *pairs, user_index=batch.user_index)
    assert T.get_submodule("ebc") is model.ebc  # the tables are shared, not copied
    user_len = batch.user_kjt.lengths().view(len(USER_KEYS), U)
    item_len = batch.item_kjt.lengths().view(len(ITEM_KEYS), N)
    # what each table looks up: the U users' ids for user tables, the N candidates' for item tables
    after = _table_ids(T, lambda: T(**request))
    before = _table_ids(model, lambda: model(*pairs))
    for k, table in enumerate(["t_user_id", "t_user_hist"]):
        assert after[table] == int(user_len[k].sum())
        assert before[table] == int(user_len[k][batch.user_index].sum())
    for k, table in enumerate(["t_item_id", "t_item_cat"]):
        assert after[table] == before[table] == int(item_len[k].sum())
    # per key: the user keys' non-empty bags are the first U rows of the one KJT the EBC gets
    seen = count_lookups(T, lambda: T(**request))
    assert seen["user_id"].rows == U and seen["item_id"].rows == N  # id features have >= 1 id per bag
    assert all(seen[k].rows <= U for k in USER_KEYS)


def test_transform_graph_modules_from_torchrec_symbolic_trace():
    model = TorchRecRanker().eval()
    example = RankerBatch.random(2, 4, seed=1).pairs()
    batch = RankerBatch.random(3, 8, seed=2)
    gms = [torchrec.fx.symbolic_trace(model, leaf_modules=["EmbeddingBagCollection"]), tri.symbolic_trace(model)]
    for gm in gms:
        tagged = mari_fx.trace(gm, SELECTORS, example)
        values = next(n for n in tagged.graph.nodes if n.target == "values")
        assert str(values.meta[TAG_KEY]) == "[user:16, item:16, user:8, item:8]"
        T = mari_fx.transform(tagged)
        got, want, _ = run(T, model, batch)
        torch.testing.assert_close(got, want)
        assert T.meta["mari_fx.record"].split_layers == ("over.0",)
    # traced through (no leaves), the EBC's tables read the KJT directly: kept at N rows, still exact
    inlined = torchrec.fx.symbolic_trace(model)
    T = mari_fx.transform(inlined, SELECTORS, example)
    got, want, _ = run(T, model, batch)
    torch.testing.assert_close(got, want)
    assert any(r.op.endswith("process_pooled_embeddings") for r in T.meta["mari_fx.record"].refused)


def test_request_helpers_roundtrip_and_verify():
    model = TorchRecRanker().eval()
    T = transform(model, verify=True)
    req = mari_fx.random_request(T, num_users=3, num_candidates=8)
    assert req["features_user"].stride() == 3 and req["features_item"].stride() == 8
    pairs = mari_fx.request_to_pairs(T, req)
    assert pairs["features"].keys() == [k for k, _, _ in TABLES.values()]
    back = mari_fx.pairs_to_request(T, **pairs, user_index=req["user_index"])
    for name in ("features_user", "features_item"):
        assert back[name].keys() == req[name].keys()
        assert torch.equal(back[name].values(), req[name].values())
        assert torch.equal(back[name].lengths(), req[name].lengths())
    assert mari_fx.verify(model, T, request=req) < 1e-5
    batch = RankerBatch.random(2, 5, seed=7)
    assert mari_fx.verify(model, T, *batch.pairs(), user_index=batch.user_index) < 1e-5


def test_declaration_errors_name_the_key():
    model = TorchRecRanker().eval()
    example = RankerBatch.random(2, 4).pairs()
    with pytest.raises(mari_fx.DeclarationError, match="'user_age' is not a key .* 'features'"):
        mari_fx.transform(model, ["features[user_age]"], example)
    with pytest.raises(mari_fx.DeclarationError, match="'user_id' .* both user-side and item-side"):
        tri.KJTKeys("features", user=["user_id"], item=["user_id", "item_id"])
    with pytest.raises(mari_fx.DeclarationError, match="'item_cat' .* neither"):
        mari_fx.transform(model, [tri.KJTKeys("features", user=USER_KEYS, item=["item_id"])], example)
    T = mari_fx.transform(model, ["user_dense", tri.KJTKeys("features", user=USER_KEYS, item=ITEM_KEYS)], example)
    assert [s.source for s in T.meta["mari_fx.record"].inputs][2:] == [
        "features[user_id, user_hist]", "features[item_id, item_cat]"]


def test_request_errors_name_the_key():
    model = TorchRecRanker().eval()
    T = transform(model)
    batch = RankerBatch.random(3, 7)
    req = mari_fx.pairs_to_request(T, *batch.pairs(), user_index=batch.user_index)
    user, item = req["features_user"], req["features_item"]
    with pytest.raises(mari_fx.RequestError, match=r"the user KJT 'features_user' \(keys \['user_id', 'user_hist'\]\) "
                                                   r"has 7 rows but user_index refers to 3 users"):
        T(**{**req, "features_user": jagged.kjt_select_rows(user, batch.user_index)})
    longer = torch.cat([req["user_index"], req["user_index"][:1]])
    with pytest.raises(mari_fx.RequestError, match=r"the item KJT 'features_item' \(keys \['item_id', 'item_cat'\]\) "
                                                   r"has 7 rows but user_index has 8 entries"):
        T(**{**req, "user_index": longer, "item_dense": torch.cat([req["item_dense"], req["item_dense"][:1]])})
    item_id_of_3 = jagged.kjt_select_rows(jagged.select_keys(item, ["item_id"]), torch.arange(3))
    both = jagged.merge([user, item_id_of_3], ["user_id", "user_hist", "item_id"])
    with pytest.raises(mari_fx.RequestError, match="key 'item_id' is declared item-side but the user KJT"):
        T(**{**req, "features_user": both})
    with pytest.raises(mari_fx.RequestError, match=r"'features_user' lacks user-side key\(s\) \['user_hist'\]"):
        T(**{**req, "features_user": jagged.select_keys(user, ["user_id"])})
    # pair-shaped inputs whose user features differ between two pairs of one user
    ud, idense, kjt = batch.pairs()
    top = int(torch.bincount(batch.user_index).argmax())
    j = int((batch.user_index == top).nonzero()[-1])  # not that user's first pair (it has >= 2)
    bags = jagged.per_key(kjt)
    values, weights, lengths = bags["user_hist"]
    lengths = lengths.clone()
    lengths[j] += 1
    bags["user_hist"] = (torch.cat([values, values.new_zeros(1)]), weights, lengths)
    broken = jagged.from_bags(kjt.keys(), bags, kjt.stride())
    with pytest.raises(mari_fx.RequestError, match=rf"user input 'features\[user_id, user_hist\]' key 'user_hist' "
                                                   rf"differs between pairs of user {top} \(pair row {j}\)"):
        mari_fx.pairs_to_request(T, ud, idense, broken, user_index=batch.user_index)


def _seq_batch(U, N, seed):
    g = torch.Generator().manual_seed(seed)
    b = RankerBatch(torch.zeros(U, 0), torch.zeros(N, 0), random_kjt(["user_seq", "user_id"], U, generator=g),
                    random_kjt(["item_seq", "item_id"], N, generator=g), RankerBatch.random(U, N, seed).user_index,
                    ["user_seq", "item_seq", "user_id", "item_id"])
    return b, b.pairs()[2]


@pytest.mark.parametrize("U,N", [(1, 5), (3, 8)])
def test_embedding_collection_user_sequence_at_U_rows(U, N):
    model = SequenceRanker().eval()
    T = mari_fx.transform(model, ["features[user_seq]", "features[user_id]"], (_seq_batch(2, 4, 0)[1],))
    batch, kjt = _seq_batch(U, N, seed=U + N)
    request = mari_fx.pairs_to_request(T, kjt, user_index=batch.user_index)
    with torch.no_grad():
        torch.testing.assert_close(T(**request), model(kjt))
    dense = next(n for n in T.graph.nodes if n.target == "to_padded_dense" and n.meta[ROWS_KEY] == "U")
    assert dense is not None and "user_tower.0" in T.meta["mari_fx.record"].hoisted
    seen = count_lookups(T, lambda: T(**request))
    assert seen["user_seq"].rows <= U and seen["user_seq"].ids == int(request["features_user"].length_per_key()[0])


class TwoKJTs(nn.Module):
    """User and item features in separate KJTs, each with its own EBC; one weighted."""

    def __init__(self):
        super().__init__()
        self.user_ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="u", embedding_dim=8, num_embeddings=100, feature_names=["user_id"])])
        self.item_ebc = EmbeddingBagCollection(is_weighted=True, tables=[
            EmbeddingBagConfig(name="i", embedding_dim=8, num_embeddings=100, feature_names=["item_id"])])
        self.user_mlp = mlp([8, 8])
        self.head = nn.Linear(16, 1)

    def forward(self, user: KeyedJaggedTensor, item: KeyedJaggedTensor) -> torch.Tensor:
        u = self.user_mlp(self.user_ebc(user).values())
        return self.head(torch.cat([u, self.item_ebc(item)["item_id"]], dim=1))


def test_whole_kjt_declared_user_and_weighted_item_kjt():
    model = TwoKJTs().eval()

    def pairs(U, N, seed):
        g = torch.Generator().manual_seed(seed)
        idx = RankerBatch.random(U, N, seed).user_index
        user = random_kjt(["user_id"], U, generator=g)
        item = random_kjt(["item_id"], N, generator=g)
        item = KeyedJaggedTensor(keys=item.keys(), values=item.values(), lengths=item.lengths(),
                                 weights=torch.rand(item.values().numel(), generator=g), stride=N)
        return jagged.kjt_select_rows(user, idx), item, idx

    T = mari_fx.transform(model, ["user"], pairs(2, 4, 0)[:2])
    u, i, idx = pairs(3, 9, 1)
    request = mari_fx.pairs_to_request(T, u, i, user_index=idx)
    assert request["user"].stride() == 3
    with torch.no_grad():
        torch.testing.assert_close(T(**request), model(u, i))
    assert {"user_ebc", "user_mlp.0"} <= set(T.meta["mari_fx.record"].hoisted)
    assert T.meta["mari_fx.record"].split_layers == ("head",)


class UserOnlyEBC(nn.Module):
    """Two EBCs on one KJT: user tables only (its output feeds a user MLP), item tables only."""

    def __init__(self):
        super().__init__()
        self.user_ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="u", embedding_dim=8, num_embeddings=100, feature_names=["user_id", "user_hist"])])
        self.item_ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="i", embedding_dim=8, num_embeddings=100, feature_names=["item_id", "item_cat"])])
        self.user_mlp = mlp([16, 8])
        self.head = nn.Linear(24, 1)

    def forward(self, user_dense, item_dense, features):
        u = self.user_mlp(self.user_ebc(features).values())
        return self.head(torch.cat([u, self.item_ebc(features).values()], dim=1))


def test_user_only_ebc_on_a_mixed_kjt_runs_at_U_rows():
    model = UserOnlyEBC().eval()
    T = transform(model)
    batch = RankerBatch.random(3, 8, seed=4)
    got, want, request = run(T, model, batch)
    torch.testing.assert_close(got, want)
    assert "user_mlp.0" in T.meta["mari_fx.record"].hoisted
    assert T.meta["mari_fx.record"].split_layers == ("head",)


class KJTReadDirectly(nn.Module):
    """Reads the KJT outside the EBC too, and returns the pooled KeyedTensor's dict."""

    def __init__(self):
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=100,
                               feature_names=["user_id", "user_hist", "item_id", "item_cat"])])

    def forward(self, user_dense, item_dense, features):
        n_hist = features["user_hist"].lengths().float().unsqueeze(1)
        d = self.ebc(features).to_dict()
        return d, n_hist * d["item_id"]


def test_unlowered_consumers_get_the_exact_pair_kjt():
    model = KJTReadDirectly().eval()
    T = transform(model)
    for seed in range(2):
        T_out, want, _ = run(T, model, RankerBatch.random(3, 7, seed=seed))
        torch.testing.assert_close(T_out, want)
    # the EBC's dict leaves the model whole: it gets the exact pair-shaped KJT, not the padded one
    calls = [n for n in T.graph.nodes if n.target is jagged.request_kjt]
    assert [n.args[4] for n in calls] == [False]


class PositionWeighted(nn.Module):
    """A feature-processed EBC (position-weighted bags) over user and item keys."""

    def __init__(self):
        from torchrec.modules.feature_processor_ import PositionWeightedModuleCollection
        from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

        super().__init__()
        ebc = EmbeddingBagCollection(tables=tri.examples.table_configs(), is_weighted=True)
        self.fp = FeatureProcessedEmbeddingBagCollection(
            ebc, PositionWeightedModuleCollection({k: 3 for k, _, _ in TABLES.values()}))
        with torch.no_grad():
            for p in self.fp.parameters():
                p.uniform_()
        self.head = nn.Linear(48 + 8 + 4, 1)

    def forward(self, user_dense, item_dense, features):
        return self.head(torch.cat([self.fp(features).values(), user_dense, item_dense], dim=1))


def test_feature_processed_ebc():
    model = PositionWeighted().eval()
    T = transform(model)
    got, want, request = run(T, model, RankerBatch.random(3, 9, seed=3))
    torch.testing.assert_close(got, want)
    assert T.meta["mari_fx.record"].split_layers == ("head",)
    seen = count_lookups(T, lambda: T(**request))
    assert seen["user_id"].rows == 3 and seen["user_id"].ids == int(request["features_user"].length_per_key()[0])


def test_quantized_inference_model_composes():
    from torchrec.inference.modules import quantize_inference_model

    model = quantize_inference_model(copy.deepcopy(TorchRecRanker().eval()))
    assert type(model.ebc).__module__ == "torchrec.quant.embedding_modules"
    T = transform(model)
    assert T.meta["mari_fx.record"].split_layers == ("over.0",)
    batch = RankerBatch.random(3, 9, seed=5)
    got, want, request = run(T, model, batch)
    torch.testing.assert_close(got, want)
    seen = count_lookups(T, lambda: T(**request))
    assert seen["user_id"].rows == 3 and seen["item_id"].rows == 9


def test_docs_recipe_runs():
    text = (Path(__file__).parent.parent / "docs" / "torchrec.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/torchrec.md has no python recipe"
    for code in blocks:
        exec(compile(code, "docs/torchrec.md", "exec"), {"__name__": "docs_recipe"})


def test_demo_prints_flops_and_lookups(capsys):
    from torchrec_integration import demo

    demo.main(users=2, candidates=40)
    out = capsys.readouterr().out
    assert re.search(r"over\.0\s+480->256\s+352\s+128\s+split", out)
    assert re.search(r"dense FLOPs\s+[\d,]+\s+[\d,]+\s+\d+\.\d+x", out)
    assert re.search(r"ids looked up: user_id .* \(40 rows\)\s+\d+ \(2 rows\)", out)


@pytest.mark.parametrize("module", ["jagged", "rules", "inputs", "registry", "trace", "lookups", "examples"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"torchrec_integration.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# --------------------------------------------------------------------------- item catalogs (precompute_items)
CATALOG_M = 5000


def _catalog_case(with_dense):
    torch.manual_seed(0)
    model = TorchRecRanker().eval()
    T = transform(model)
    g = torch.Generator().manual_seed(11)
    catalog = {"features_item": random_kjt(ITEM_KEYS, CATALOG_M, generator=g)}
    if with_dense:
        catalog["item_dense"] = torch.randn(CATALOG_M, 4, generator=g)
    return model, T, catalog


def _catalog_batch(catalog, U, N, seed):
    """A request whose candidates are catalog rows: (pairs for the model, T's request, P's request)."""
    batch = RankerBatch.random(U, N, seed=seed)
    rows = torch.randint(CATALOG_M, (N,), generator=torch.Generator().manual_seed(seed))
    batch.item_kjt = jagged.kjt_select_rows(catalog["features_item"], rows)
    if "item_dense" in catalog:
        batch.item_dense = catalog["item_dense"][rows]
    return batch, rows, batch.pairs()


@pytest.mark.parametrize("with_dense", [False, True], ids=["kjt", "kjt+item_dense"])
@pytest.mark.parametrize("U,N", [(1, 1), (1, 1000), (3, 3), (3, 1000)])  # U > N: T refuses (users without candidates)
def test_kjt_item_keys_as_catalog_inputs(with_dense, U, N):
    model, T, catalog = _catalog_case(with_dense)
    lengths = catalog["features_item"].lengths().view(len(ITEM_KEYS), CATALOG_M)
    assert (lengths == 0).any() and list(catalog["features_item"].keys()) == ITEM_KEYS  # some empty bags
    code = T.code
    P = mari_fx.precompute_items(T, catalog, chunk_rows=1700)  # chunks cut the KJT by bags
    assert T.code == code
    batch, rows, pairs = _catalog_batch(catalog, U, N, seed=U * 100 + N)
    t_request = mari_fx.pairs_to_request(T, *pairs, user_index=batch.user_index)
    p_request = {k: v for k, v in t_request.items() if k not in catalog}
    p_request["item_row"] = rows
    with torch.no_grad():
        got, want = P(**p_request), model(*pairs)
    torch.testing.assert_close(got, want)
    assert got.dtype == want.dtype
    # the request no longer carries the item KJT; the item keys are looked up once per catalog item
    inputs = [n.target for n in P.graph.nodes if n.op == "placeholder"]
    assert "features_item" not in inputs and "item_row" in inputs
    assert ("item_dense" in inputs) == (not with_dense)
    assert [n.target for n in P.graph.nodes if n.op == "call_module"].count("ebc") == 1  # the user keys' lookup
    cache = P.meta["mari_fx.record"].item_cache
    if with_dense:  # the item part of the split over-arch Linear, over the pooled item keys and the dense
        assert [(c.source, c.width) for c in cache] == [("over.0 (item product)", 64)]
        assert getattr(P.over, "0").weight_item is not None
    else:  # the item keys' pooled columns (item_dense stays a request input)
        assert sorted(c.width for c in cache) == [8, 16]
    saved = N * sum(c.flops_saved_per_candidate for c in cache)
    assert mari_fx.count_flops(P, **p_request) == mari_fx.count_flops(T, **t_request) - saved
    if with_dense:
        assert saved > 0


def test_kjt_catalog_refresh_and_bad_catalogs():
    model, T, catalog = _catalog_case(True)
    kjt = catalog["features_item"]
    for bad, match in [
            ({"features_item": jagged.select_keys(kjt, ["item_id"])}, r"lacks item key 'item_cat'"),
            ({"features_item": random_kjt(["item_id", "item_cat", "user_id"], 5)}, r"carries key 'user_id'"),
            ({"features_item": torch.zeros(5, 2)}, r"catalog\['features_item'\] must be a KeyedJaggedTensor"),
            ({"features_item": kjt, "item_dense": torch.randn(7, 4)}, r"catalog\['features_item'\] has 5000 rows but catalog\['item_dense'\] has 7"),
            ({"features[user_id, user_hist]": kjt}, "is a user input")]:
        with pytest.raises(mari_fx.errors.DeclarationError, match=match):
            mari_fx.precompute_items(T, bad)
    P = mari_fx.precompute_items(T, {"features[item_id, item_cat]": kjt, "item_dense": catalog["item_dense"]})
    # a new catalog (other M) and a weight update: refresh reads P's weights
    g = torch.Generator().manual_seed(3)
    new = {"features_item": random_kjt(ITEM_KEYS, 40, generator=g), "item_dense": torch.randn(40, 4, generator=g)}
    with torch.no_grad():
        model.ebc.embedding_bags["t_item_cat"].weight.mul_(2)
        P.ebc.embedding_bags["t_item_cat"].weight.mul_(2)
    with pytest.raises(mari_fx.errors.DeclarationError, match="lacks item key 'item_id'"):
        P.refresh({"features_item": jagged.select_keys(new["features_item"], ["item_cat"]), "item_dense": new["item_dense"]})
    P.refresh(new)
    batch = RankerBatch.random(2, 9, seed=4)
    rows = torch.randint(40, (9,), generator=g)
    batch.item_kjt, batch.item_dense = jagged.kjt_select_rows(new["features_item"], rows), new["item_dense"][rows]
    pairs = batch.pairs()
    with torch.no_grad():
        got = P(user_dense=batch.user_dense, features_user=batch.user_kjt, item_row=rows, user_index=batch.user_index)
        torch.testing.assert_close(got, model(*pairs))


class _WritesIntoKeyedTensor(TorchRecRanker):
    """Doubles the pooled embeddings in place through ``kt.values()``, then reads the KeyedTensor
    again: the write lands in memory the KeyedTensor holds."""

    def forward(self, user_dense, item_dense, features):
        kt = self.ebc(features)
        kt.values().mul_(2.0)
        x = torch.cat([self.user_tower(user_dense), kt.values(), item_dense], dim=1)
        return self.over(x).squeeze(-1)


def _kt_writer_verdict():
    torch.manual_seed(0)
    model = _WritesIntoKeyedTensor().eval()
    T = mari_fx.transform(model, ["user_dense", "features[user_id]", "features[user_hist]"],
                          RankerBatch.random(2, 5, seed=1).pairs())
    b = RankerBatch.random(3, 9, seed=4)
    got = T(user_dense=b.user_dense, item_dense=b.item_dense, features_user=b.user_kjt, features_item=b.item_kjt,
            user_index=b.user_index)
    return torch.allclose(got, model(*b.pairs()), atol=1e-5)


def test_write_into_memory_a_keyed_tensor_holds_is_refused():
    """``kt.values().mul_(2)`` writes into the KeyedTensor; a later ``kt.values()`` is a fresh call
    the functional graph cannot redirect, so the write is refused (naming it), not lost."""
    with pytest.raises(mari_fx.TraceError, match=r"mul_.*holds.*KeyedTensor|KeyedTensor.*holds"):
        _kt_writer_verdict()


def test_control_write_into_keyed_tensor_without_the_refusal(monkeypatch):
    """Positive control: without the refusal the transform succeeds and gives a wrong answer."""
    from mari_fx.frontend import functionalize

    monkeypatch.setattr(functionalize, "_held_tensors", lambda value: [])
    assert _kt_writer_verdict() is False
