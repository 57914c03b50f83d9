"""Bad input gets a clear error naming what is at fault; never a silently wrong result."""
import pytest
import torch
import torch.nn as nn

import mari_fx
from mari_fx.testing.examples import CoarseRanker, DictRanker, PackedRanker

EX = (torch.randn(4, 16), torch.randn(4, 8))


@pytest.fixture
def T():
    return mari_fx.transform(CoarseRanker().eval(), ["user"], EX)


def test_untraceable_model_says_why():
    class DataDependent(nn.Module):
        def forward(self, user, item):
            if user.sum() > 0:
                return user
            return item

    with pytest.raises(mari_fx.TraceError, match=r"cannot trace DataDependent.*\n.*cause: data-dependent"):
        mari_fx.transform(DataDependent(), ["user"], EX)


class PackedGRU(nn.Module):
    """DIEN-style interest extractor over a padded history: ``pack=True`` packs it (the lengths are
    read as data: no capture route follows it); ``pack=False`` is the suggested rewrite."""

    def __init__(self, pack: bool):
        super().__init__()
        self.pack = pack
        self.emb, self.gru, self.out = nn.Embedding(30, 4), nn.GRU(4, 4, batch_first=True), nn.Linear(8, 1)

    def forward(self, hist, item):
        lengths = (hist > 0).sum(1)
        x = self.emb(hist)
        if self.pack:
            _, h = self.gru(nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                              enforce_sorted=False))
            last = h[-1]
        else:
            out, _ = self.gru(x)
            last = out.gather(1, (lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, 4)).squeeze(1)
        return self.out(torch.cat([last, self.emb(item)], -1))


def test_packed_sequence_says_why_and_the_suggested_rewrite_runs_at_u_rows():
    hist = torch.tensor([[3, 4, 0, 0], [5, 0, 0, 0], [6, 7, 8, 9]])
    idx, item = torch.tensor([0, 2, 1, 1, 0]), torch.tensor([1, 2, 3, 4, 5])
    with pytest.raises(mari_fx.TraceError, match=r"(?s)cause: a traced value read as data.*pack_padded_sequence"):
        mari_fx.transform(PackedGRU(pack=True).eval(), ["hist"], (hist[idx], item))
    model = PackedGRU(pack=False).eval()
    T = mari_fx.transform(model, ["hist"], (hist[idx], item))
    assert {n.meta["mari_fx.rows"] for n in T.graph.nodes if n.target == "gru"} == {"U"}
    with torch.no_grad():
        torch.testing.assert_close(T(hist=hist, item=item, user_index=idx), model(hist[idx], item))


def test_declared_input_that_does_not_exist():
    with pytest.raises(mari_fx.DeclarationError, match=r"'usr'.*arguments are \['user', 'item'\]"):
        mari_fx.transform(CoarseRanker(), ["usr"], EX)


def test_declared_dict_key_that_does_not_exist():
    with pytest.raises(mari_fx.DeclarationError, match=r"'x\[user_name\]' is not a key"):
        mari_fx.transform(DictRanker(), ["x[user_name]"], (DictRanker.example_batch(4),))


def test_overlapping_user_columns():
    with pytest.raises(mari_fx.DeclarationError, match=r"'X\[:, 0:3\]' and 'X\[:, 2:5\]' overlap"):
        mari_fx.transform(PackedRanker(), ["X[:, 0:3]", "X[:, 2:5]"], (torch.randn(4, 12),))


def test_columns_out_of_range():
    with pytest.raises(mari_fx.DeclarationError, match=r"out of range: 'X' has 12 columns"):
        mari_fx.transform(PackedRanker(), ["X[:, 10:14]"], (torch.randn(4, 12),))


def test_unparseable_selector():
    with pytest.raises(mari_fx.DeclarationError, match="cannot parse input selector 'user]x\\['"):
        mari_fx.transform(CoarseRanker(), ["user]x["], EX)
    with pytest.raises(mari_fx.DeclarationError, match="give an explicit end column"):
        mari_fx.transform(CoarseRanker(), ["user[:, 2:]"], EX)


def test_example_with_one_row_is_refused():
    with pytest.raises(mari_fx.DeclarationError, match=">= 2 pairs"):
        mari_fx.transform(CoarseRanker(), ["user"], (torch.randn(1, 16), torch.randn(1, 8)))


def test_example_rows_disagree():
    with pytest.raises(mari_fx.DeclarationError, match="'item' has 5 rows"):
        mari_fx.transform(CoarseRanker(), ["user"], (torch.randn(4, 16), torch.randn(5, 8)))


def test_user_index_wrong_dtype(T):
    with pytest.raises(mari_fx.RequestError, match="torch.int64"):
        T(user=torch.randn(2, 16), item=torch.randn(3, 8), user_index=torch.tensor([0, 1, 1], dtype=torch.int32))


def test_user_index_wrong_length(T):
    with pytest.raises(mari_fx.RequestError, match="item input 'item' has 3 rows but user_index has 4"):
        T(user=torch.randn(2, 16), item=torch.randn(3, 8), user_index=torch.tensor([0, 1, 1, 0]))


def test_user_index_out_of_range(T):
    with pytest.raises(mari_fx.RequestError, match="'user' has 2 rows but user_index refers to 4 users"):
        T(user=torch.randn(2, 16), item=torch.randn(3, 8), user_index=torch.tensor([0, 3, 1]))


def test_user_index_negative(T):
    with pytest.raises(mari_fx.RequestError, match="negative"):
        T(user=torch.randn(2, 16), item=torch.randn(3, 8), user_index=torch.tensor([0, -1, 1]))


def test_user_inputs_passed_pair_shaped(T):
    # N rows of user features instead of U: would silently gather the wrong rows without the check
    with pytest.raises(mari_fx.RequestError, match="'user' has 3 rows but user_index refers to 2 users"):
        T(user=torch.randn(3, 16), item=torch.randn(3, 8), user_index=torch.tensor([0, 1, 1]))


def test_pairs_to_request_rejects_inconsistent_user_rows(T):
    user = torch.randn(3, 16)  # rows 1 and 2 should be identical (same user) but are not
    with pytest.raises(mari_fx.RequestError, match=r"user input 'user' differs between pairs of user 1 \(pair row 2\)"):
        mari_fx.pairs_to_request(T, user, torch.randn(3, 8), user_index=torch.tensor([0, 1, 1]))


def test_pairs_to_request_rejects_user_without_candidates(T):
    with pytest.raises(mari_fx.RequestError, match="user 1 has no candidate"):
        mari_fx.pairs_to_request(T, torch.randn(3, 16), torch.randn(3, 8), user_index=torch.tensor([0, 2, 2]))


def test_tagged_graph_with_new_declarations_is_refused():
    tagged = mari_fx.trace(CoarseRanker(), ["user"], EX)
    with pytest.raises(mari_fx.DeclarationError, match="already tagged"):
        mari_fx.transform(tagged, ["user"])


def test_dict_used_other_than_by_constant_key():
    class M(nn.Module):
        def forward(self, x):
            return x.get("a")

    with pytest.raises(mari_fx.DeclarationError, match="dict input 'x' is used by"):
        mari_fx.transform(M(), ["x[a]"], ({"a": torch.ones(2, 2)},))


class MetaEmbeddings(nn.Module):
    """AutoDis names its meta-embeddings ``self.meta``: torch.fx's GraphModule sets ``meta`` on itself."""

    def __init__(self):
        super().__init__()
        self.meta = nn.Parameter(torch.randn(4, 3))
        self.head = nn.Linear(3 + 2, 1)

    def forward(self, u, i):
        return self.head(torch.cat([u @ self.meta, i], 1))


def test_top_level_name_reserved_by_graph_module_is_named_with_the_fix():
    model = MetaEmbeddings().eval()
    with pytest.raises(mari_fx.TraceError, match=r"named 'meta'.*rename it \(e\.g\. self\.meta_\)"):
        mari_fx.transform(model, ["u"], (torch.randn(4, 4), torch.randn(4, 2)))
    assert isinstance(model.meta, nn.Parameter)  # the model is left as it was


def test_declared_list_element_that_does_not_exist():
    class Lists(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 1)

        def forward(self, feats):
            return self.head(torch.cat(feats, 1))

    with pytest.raises(mari_fx.DeclarationError, match=r"'feats\[5\]': the example list has elements 0\.\.1"):
        mari_fx.transform(Lists().eval(), ["feats[5]"], ([torch.randn(4, 2), torch.randn(4, 2)],))
