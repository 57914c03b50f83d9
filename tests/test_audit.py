"""The audit (mari_fx.report.audit, ``report --audit``): user columns measured on a probe batch
next to the proof, where the proof lost them, and the share of the attainable saving realised."""
import contextlib
import io
import json
import re

import pytest
import torch
import torch.nn as nn

import mari_fx
from mari_fx.report.audit import audit, measure, probe_inputs
from mari_fx.cli import main
from mari_fx.testing.examples import CoarseRanker, DictRanker, PackedRanker, mlp
from mari_fx.report import build_report, report


def _proved_measured(a):
    return [(l.name, l.user_columns, l.measured_user_columns) for l in a.layers]


def _assert_sound(a):
    # a proved-USER column is equal across the pairs of each user on any data: measured < proved
    # would mean the probe caught the proof claiming a column that is not user-only
    for l in a.layers:
        assert l.measured_user_columns >= l.user_columns, l
        assert (l.lost_at != "") == l.short == (l.name in a.layers_short), l
        assert l.short <= (l.measured_user_columns > l.user_columns), l


# --------------------------------------------------------------------------- complete proofs
@pytest.mark.parametrize("layout", ["neat", "interleaved"])
def test_complete_proof_measures_what_it_proves(layout):
    torch.manual_seed(0)
    model = CoarseRanker(layout=layout).eval()
    a = audit(model, ["user"], (torch.randn(6, 16), torch.randn(6, 8)))
    # tower layers: all 16 / 64 inputs user; fusion.0: the 32 tower columns (fragmented or not), fusion.2+: mixed
    assert _proved_measured(a) == [("user_tower.0", 16, 16), ("user_tower.2", 64, 64), ("fusion.0", 32, 32),
                                   ("fusion.2", 0, 0), ("fusion.4", 0, 0)]
    assert a.realised == pytest.approx(1.0, abs=0.01)
    assert a.flops_attainable == a.flops_after and a.layers_short == ()
    assert all(l.lost_at == "" for l in a.layers)
    assert a.probe_pairs >= 100 and a.probe_users >= 2


def test_packed_and_dict_inputs_complete():
    torch.manual_seed(0)
    packed = PackedRanker().eval()
    a = audit(packed, packed.user_selectors(), (torch.randn(6, 12),))
    _assert_sound(a)
    # user_proj: the 7 user columns; wide: 7 of the 12 packed columns; head: relu(user_proj) = 16 of 32
    assert [(l.name, l.measured_user_columns) for l in a.layers] == [("user_proj", 7), ("wide", 7), ("head.0", 16),
                                                                       ("head.2", 0)]
    assert a.realised == pytest.approx(1.0, abs=0.01)
    d = DictRanker().eval()
    a = audit(d, ["x[user_id]", "x[user_age]", "x[hist_item_ids]"], (DictRanker.example_batch(6),))
    _assert_sound(a)
    assert a.layers_short == () and a.realised == pytest.approx(1.0, abs=0.01)


# --------------------------------------------------------------------------- a proof gap
@torch.fx.wrap
def opaque_scale(x):
    """No mari_fx rule: its output is MIXED although only user data reaches it."""
    return x * 2.0


class OpaqueRanker(nn.Module):
    def __init__(self):
        super().__init__()
        self.user_tower = mlp([16, 32])
        self.fusion = mlp([32 + 8, 16, 1], last_act=False)

    def forward(self, user, item):
        return self.fusion(torch.cat([opaque_scale(self.user_tower(user)), item], dim=-1))


def test_opaque_op_is_named_and_costed():
    torch.manual_seed(0)
    model = OpaqueRanker().eval()
    a = audit(model, ["user"], (torch.randn(6, 16), torch.randn(6, 8)), users=2, candidates=100)
    _assert_sound(a)
    fusion = next(l for l in a.layers if l.name == "fusion.0")
    assert (fusion.user_columns, fusion.measured_user_columns) == (0, 32)
    assert fusion.lost_at == "opaque_scale (test_audit.opaque_scale)"
    assert a.layers_short == ("fusion.0",)
    # attainable: the 32 tower columns at U rows, the 8 item columns at N: 2*16*(2*32 + 100*8)
    assert fusion.flops_before == fusion.flops_after == 2 * 16 * 40 * 100
    assert fusion.flops_attainable == 2 * 16 * (2 * 32 + 100 * 8)
    before, after = a.flops_before, a.flops_after
    attainable = after - (fusion.flops_after - fusion.flops_attainable)
    assert a.flops_attainable == attainable
    assert a.realised == pytest.approx((before - after) / (before - attainable)) and a.realised < 0.9


def test_audit_never_changes_the_rewrite():
    torch.manual_seed(0)
    model = OpaqueRanker().eval()
    example = (torch.randn(6, 16), torch.randn(6, 8))
    T = mari_fx.transform(model, ["user"], example)
    code, record = T.code, T.meta["mari_fx.record"]
    r = build_report(model, T, candidates=50, audit=True)
    assert T.code == code and T.meta["mari_fx.record"] is record
    assert r["split_layers"] == [] and r["layers"][1]["action"] == "kept"
    assert r["layers"][1]["measured_user_columns"] == 32


def test_constant_columns_are_not_user_data():
    # item column 0 is padding (always 0): equal across each user's pairs, but constant, so not counted
    torch.manual_seed(0)
    model = CoarseRanker().eval()
    item = torch.randn(6, 8)
    item[:, 0] = 0.0
    a = audit(model, ["user"], (torch.randn(6, 16), item))
    assert _proved_measured(a)[2] == ("fusion.0", 32, 32)


# --------------------------------------------------------------------------- the probe
def test_probe_is_ragged_fresh_and_in_range():
    ex = {"user_id": torch.randint(3, 50, (6,)), "user_age": torch.rand(6, 1) + 10.0,
          "hist_item_ids": torch.randint(0, 200, (6, 5)), "item_id": torch.randint(100, 120, (6,)),
          "item_price": torch.rand(6, 1)}
    gm = mari_fx.trace(DictRanker().eval(), ["x[user_id]", "x[user_age]", "x[hist_item_ids]"], (ex,))
    index = torch.tensor([0, 1, 1, 2, 2, 2, 0, 2])
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(names, probe_inputs(gm, index, seed=3)))
    for name, v in values.items():
        assert v.dtype == ex[name.removeprefix("x_")].dtype and v.shape[0] == 8
    uid, iid = values["x_user_id"], values["x_item_id"]
    assert torch.equal(uid, uid[torch.tensor([0, 1, 1, 3, 3, 3, 0, 3])])  # one row per user, gathered
    assert 3 <= int(uid.min()) and int(uid.max()) < 50 and 100 <= int(iid.min()) and int(iid.max()) < 120
    assert values["x_user_age"].min() > 5.0  # floats keep the example's mean and spread
    assert len(set(values["x_hist_item_ids"].tolist()[i][0] for i in (0, 1, 3))) >= 2


def test_two_probes_agree_and_seeds_change_the_data():
    torch.manual_seed(0)
    model = CoarseRanker().eval()
    example = (torch.randn(6, 16), torch.randn(6, 8))
    tagged = mari_fx.trace(model, ["user"], example)
    T = mari_fx.transform(tagged)
    a, b = measure(tagged, T, seed=0), measure(tagged, T, seed=7)
    assert _proved_measured(a) == _proved_measured(b)
    i0 = probe_inputs(tagged, torch.tensor([0, 1, 1]), seed=0)
    i7 = probe_inputs(tagged, torch.tensor([0, 1, 1]), seed=7)
    assert not torch.equal(i0[1], i7[1])


# --------------------------------------------------------------------------- report and CLI
def test_report_json_keys_and_retrace_path():
    torch.manual_seed(0)
    model = PackedRanker().eval()
    example = (torch.randn(6, 12),)
    data = report(model, model.user_selectors(), example, candidates=100, audit=True)
    json.dumps(data)
    assert data["schema"] == "mari_fx.report/1"
    assert set(data["audit"]) >= {"probe", "flops_after_attainable", "realised", "layers_short"}
    assert data["audit"]["probe"]["users"] >= 2 and data["audit"]["probe"]["pairs"] >= 100
    assert data["audit"]["flops_after_attainable"] <= data["flops"]["layers_after"]
    assert all({"measured_user_columns", "lost_at"} <= set(l) for l in data["layers"])
    # build_report on an existing T traces the model again (declarations read off T's request spec)
    T = mari_fx.transform(model, model.user_selectors(), example)
    again = build_report(model, T, candidates=100, audit=True)
    assert [l["measured_user_columns"] for l in again["layers"]] == [l["measured_user_columns"] for l in data["layers"]]
    assert again["audit"]["realised"] == data["audit"]["realised"]
    plain = build_report(model, T, candidates=100)
    assert "audit" not in plain and "measured_user_columns" not in plain["layers"][0]


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_audit_table_and_json():
    code, out, _ = _cli(["report", "mari_fx.testing.factories:coarse_ranker", "--user", "user", "--audit", "-n", "50"])
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("layer"))
    assert "measured user" in header and "lost at" in header
    assert "audit: realised 100.0%" in out
    code, out, _ = _cli(["report", "mari_fx.testing.factories:coarse_ranker", "--user", "user", "--audit", "--json"])
    data = json.loads(out)
    assert code == 0 and data["audit"]["realised"] == pytest.approx(1.0)
    code, out, _ = _cli(["report", "mari_fx.testing.factories:coarse_ranker", "--user", "user"])
    assert "measured user" not in out and "audit:" not in out


# --------------------------------------------------------------------------- torchrec models, hand counts
torchrec = pytest.importorskip("torchrec")


def _torchrec_case(kind):
    """A torchrec.models model over 4 sparse fields, user and item keys interleaved (D = 8 each),
    and 6 dense features whose first 4 are user-side (declared with a packed selector)."""
    import torchrec_integration  # noqa: F401  (teaches mari_fx KJT inputs)
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.deepfm import SimpleDeepFMNN
    from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection
    from torchrec_integration.examples import random_kjt

    keys = [("user_id", "user"), ("item_id", "item"), ("user_hist", "user"), ("item_cat", "item")]
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f"t_{k}", embedding_dim=8, num_embeddings=100,
                                                            feature_names=[k]) for k, _ in keys])
    model = {
        "DLRM": lambda: DLRM(ebc, 6, [16, 8], [16, 1]),
        "DLRM_DCN": lambda: DLRM_DCN(ebc, 6, [16, 8], [16, 1], dcn_num_layers=2, dcn_low_rank_dim=4),
        "DLRM_Projection": lambda: DLRM_Projection(ebc, 6, [16, 8], [16, 1], interaction_branch1_layer_sizes=[16, 16],
                                                   interaction_branch2_layer_sizes=[16, 24]),
        "SimpleDeepFMNN": lambda: SimpleDeepFMNN(6, ebc, hidden_layer_size=16, deep_fm_dimension=8),
    }[kind]().eval()
    g = torch.Generator().manual_seed(1)
    example = (torch.randn(8, 6, generator=g), random_kjt([k for k, _ in keys], 8, generator=g))
    selectors = ["dense_features[:, 0:4]"] + [f"sparse_features[{k}]" for k, side in keys if side == "user"]
    return model, selectors, example


# Hand counts of the user-derivable input columns per Linear (fields: dense d, user_id a, item_id b,
# user_hist c, item_cat e; the dense arch mixes user and item dense features, so d is mixed):
HAND = {
    # dense arch: 4 user dense columns, then mixed; over-arch input [d (8) | triu pairs of (d, a, b, c, e) (10)]:
    # only the pair a.c is user x user -> 1
    "DLRM": [4, 0, 1, 0],
    # crossnet over reshape(B, -1) of [d, a, b, c, e] (40): a and c -> 16; after the first cross layer
    # (x0 * (W(V x)) + b + x, mixing every field) nothing is user-only; over-arch input mixed
    "DLRM_DCN": [4, 0, 16, 0, 0, 0, 0, 0],
    # both projection branches read reshape(B, -1) of [d, a, b, c, e]: a and c -> 16 each; their second
    # layers and the over-arch ([d | bmm of the branches]) are mixed
    "DLRM_Projection": [4, 0, 16, 0, 16, 0, 0, 0],
    # deep FM input: flatten-cat of [d, a, b, c, e] -> a and c = 16; over-arch [d | deep | fm] mixed
    "SimpleDeepFMNN": [4, 0, 16, 0],
}


@pytest.mark.parametrize("kind", sorted(HAND))
def test_torchrec_models_match_hand_count(kind):
    model, selectors, example = _torchrec_case(kind)
    a = audit(model, selectors, example)
    assert [l.measured_user_columns for l in a.layers] == HAND[kind], a.table()
    _assert_sound(a)
    assert a.probe_data == "fresh"  # KJTs drawn per key within the example's lengths and ids
    assert 0.0 <= a.realised <= 1.0 + 1e-9


def test_dlrm_all_dense_user_hand_count():
    # every dense feature user-side: the dense arch is user-only (6, then 16 columns) and the over-arch
    # input is the 8 dense-arch outputs plus the triu pairs among (d, a, c): d.a, d.c, a.c -> 11
    model, selectors, example = _torchrec_case("DLRM")
    a = audit(model, ["dense_features"] + selectors[1:], example)
    assert [l.measured_user_columns for l in a.layers] == [6, 16, 11, 0]
    _assert_sound(a)


def test_docs_audit_example_prints_what_docs_say():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "report.md").read_text()
    section = text[text.index("## The audit"):text.index("### What is measured")]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    k = next(i for i, (lang, _) in enumerate(blocks) if lang == "python")
    code, shown = blocks[k][1], blocks[k + 1][1].strip()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/report.md", "exec"), {"__name__": "__main__"})
    assert out.getvalue().strip() == shown
