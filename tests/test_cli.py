"""``mari-fx report``: run as a subprocess on the example models; table rows, JSON values, exit codes.

FLOPs are checked against numbers computed here from the layer shapes (2 FLOPs
per multiply-add), not against the code under test.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
import torch

import mari_fx
from mari_fx.cli import main
from mari_fx.testing.factories import interleaved_ranker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Keys of the JSON report documented as stable in docs/report.md.
TOP_KEYS = {"schema", "model", "target", "user_inputs", "users", "candidates", "split_matmuls", "inputs", "layers",
            "split_layers", "hoisted", "broadcasts", "refused", "flops"}
LAYER_KEYS = {"name", "op", "in_features", "out_features", "user_columns", "item_columns", "mixed_columns",
              "rows_per_sample", "action", "rewritten", "reason", "flops_before", "flops_after"}
FLOPS_KEYS = {"method", "before", "after", "speedup", "layers_before", "layers_after", "layers_speedup"}


def run_cli(*args, cwd=ROOT):
    proc = subprocess.run([sys.executable, "-m", "mari_fx", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def table_rows(text):
    """Rows of the layer table: {name: (op, in->out, user, item, mixed, action, why, before, after)}."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("layer "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        name, op, inout, user, item, mixed, action = cells[:7]
        why = cells[7] if len(cells) == 10 else ""
        before, after = (int(c.replace(",", "")) for c in cells[-2:])
        rows[name] = (op, inout, int(user), int(item), int(mixed), action, why, before, after)
    return rows


def coarse_flops(U, N, user_dim=16, item_dim=8, tower=(64, 32), fusion=(64, 32)):
    """Per-layer (before, after) FLOPs of CoarseRanker, from its shapes."""
    t_dims = [user_dim, *tower]
    f_dims = [tower[-1] + item_dim, *fusion, 1]
    out = {}
    for k, (a, b) in enumerate(zip(t_dims[:-1], t_dims[1:])):
        out[f"user_tower.{2 * k}"] = (2 * N * a * b, 2 * U * a * b)
    for k, (a, b) in enumerate(zip(f_dims[:-1], f_dims[1:])):
        after = 2 * b * (U * tower[-1] + N * item_dim) if k == 0 else 2 * N * a * b
        out[f"fusion.{2 * k}"] = (2 * N * a * b, after)
    return out


def test_report_table_of_coarse_ranker():
    rc, out, err = run_cli("report", "mari_fx.testing.factories:coarse_ranker", "--user", "user", "--users", "2",
                           "--candidates", "50")
    assert rc == 0, err
    rows = table_rows(out)
    expected = coarse_flops(2, 50)
    assert list(rows) == list(expected)  # one row per Linear, in graph order
    for name, (before, after) in expected.items():
        assert rows[name][-2:] == (before, after), name
    assert rows["fusion.0"][:7] == ("Linear", "40 -> 64", 32, 8, 0, "split", "")
    assert rows["user_tower.0"][5] == rows["user_tower.2"][5] == "hoisted"
    assert rows["fusion.2"][5] == "kept" and rows["fusion.2"][6] == "input has no user-only columns"
    total_before = sum(b for b, _ in expected.values())
    total_after = sum(a for _, a in expected.values())
    m = re.search(r"before ([\d,]+), after ([\d,]+): FLOPs-bound speedup ([\d.]+)x", out)
    assert (int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))) == (total_before, total_after)
    assert float(m.group(3)) == pytest.approx(total_before / total_after, abs=0.005)
    assert "split layers: fusion.0" in out
    assert re.search(r"hoisted to the user batch \(U rows\): user_tower\.0, user_tower\.1, user_tower\.2, "
                     r"user_tower\.3$", out, re.M)
    assert "ops that blocked a rewrite: none" in out
    assert err == ""


def test_report_json_of_interleaved_ranker_matches_independent_flops():
    U, N = 3, 200
    rc, out, err = run_cli("report", "mari_fx.testing.factories:interleaved_ranker", "--user", "user", "--users", str(U),
                           "--candidates", str(N), "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert TOP_KEYS <= set(data) and "nodes" not in data
    assert data["schema"] == "mari_fx.report/1" and (data["users"], data["candidates"]) == (U, N)
    assert data["split_layers"] == ["fusion.0"]
    layers = {l["name"]: l for l in data["layers"]}
    for l in data["layers"]:
        assert LAYER_KEYS <= set(l)
    fusion = layers["fusion.0"]
    assert (fusion["user_columns"], fusion["item_columns"], fusion["mixed_columns"]) == (32, 8, 0)
    assert fusion["action"] == "split" and fusion["rewritten"] is True
    assert layers["fusion.2"]["rewritten"] is False
    expected = coarse_flops(U, N)
    assert {n: (l["flops_before"], l["flops_after"]) for n, l in layers.items()} == expected
    flops = data["flops"]
    assert set(flops) >= FLOPS_KEYS
    # measured numbers: the interleaved layout costs nothing once permuted, so the
    # transformed module does exactly the analytic minimum
    model = interleaved_ranker()[0]
    user, item = torch.randn(N, 16), torch.randn(N, 8)
    assert flops["before"] == mari_fx.count_flops(model, user, item) == sum(b for b, _ in expected.values())
    assert flops["after"] == flops["layers_after"] == sum(a for _, a in expected.values())
    assert flops["speedup"] == pytest.approx(flops["before"] / flops["after"])
    assert data["refused"] == [] and data["hoisted"][:2] == ["user_tower.0", "user_tower.1"]


def test_report_dict_ranker_repeated_and_extended_user_flags():
    rc, out, err = run_cli("report", "mari_fx.testing.factories:dict_ranker", "--user", "x[user_id]", "--user",
                           "x[user_age]", "x[hist_item_ids]", "--users", "3", "--candidates", "7", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert data["user_inputs"] == ["x[user_id]", "x[user_age]", "x[hist_item_ids]"]
    sides = {i["source"]: i["side"] for i in data["inputs"]}
    assert sides == {"x[user_id]": "user", "x[user_age]": "user", "x[hist_item_ids]": "user",
                     "x[item_id]": "item", "x[item_price]": "item"}
    head = next(l for l in data["layers"] if l["name"] == "head.0")
    # head.0 sees cat([user_mlp(...) (32), item_emb (8), item_price (1)])
    assert (head["action"], head["user_columns"], head["item_columns"]) == ("split", 32, 9)
    assert head["flops_before"] == 2 * 32 * 7 * 41 and head["flops_after"] == 2 * 32 * (3 * 32 + 7 * 9)
    mlp0 = next(l for l in data["layers"] if l["name"] == "user_mlp.0")
    assert (mlp0["action"], mlp0["flops_after"]) == ("hoisted", 2 * 32 * 3 * 17)


def test_report_all_lists_nodes_with_their_rows():
    rc, out, err = run_cli("report", "mari_fx.testing.factories:packed_ranker", "--user", "X[:, 0:3]", "X[:, 5:9]",
                           "--users", "2", "--candidates", "10", "--all", "--json")
    assert rc == 0, err
    data = json.loads(out)
    nodes = {n["name"]: n for n in data["nodes"]}
    assert nodes["user_proj"]["rows"] == "U" and nodes["user_proj"]["op"].endswith("Linear")
    assert nodes["wide"]["rows"] == "N" and nodes["wide"]["op"] == "mari_fx.runtime.modules.SplitLinear"
    assert nodes["X_user"]["rows"] == "U" and nodes["X_item"]["rows"] == "N"
    assert set(data["split_layers"]) == {"wide", "head.0"}

def test_report_all_as_a_table(capsys):
    assert main(["report", "mari_fx.testing.factories:packed_ranker", "--user", "X[:, 0:3]", "X[:, 5:9]",
                 "--users", "2", "--candidates", "10", "--all"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^user_proj\s+Linear\s+U\s+user$", out, re.M)
    assert re.search(r"^wide\s+SplitLinear\s+N\s+mixed$", out, re.M)
    wide = table_rows(out)["wide"]
    assert wide[:6] == ("Linear", "12 -> 16", 7, 5, 0, "split")
    assert wide[-2:] == (2 * 16 * 10 * 12, 2 * 16 * (2 * 7 + 10 * 5))


BLOCKED = textwrap.dedent('''
    import torch, torch.nn as nn

    class Centered(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = nn.Linear(16, 32)
            self.head = nn.Linear(40, 1)

        def forward(self, user, item):
            u = torch.relu(self.tower(user))
            u = u - u.mean(dim=0, keepdim=True)  # couples rows across the batch
            return self.head(torch.cat([u, item], -1))

    def make():  # the 3-tuple form: positional args empty, inputs by keyword
        torch.manual_seed(0)
        return Centered().eval(), (), {"user": torch.randn(4, 16), "item": torch.randn(4, 8)}

    class Loops(nn.Module):
        def forward(self, user, item):
            if user.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return item
            return user

    def loops():
        return Loops(), (torch.randn(4, 3), torch.randn(4, 3))

    def not_a_tuple():
        return Centered()
''')


@pytest.fixture()
def factory_file(tmp_path):
    path = tmp_path / "my_factories.py"
    path.write_text(BLOCKED)
    return path


@pytest.fixture()
def static_program(tmp_path):
    """A saved ExportedProgram with a static batch size: the rows of a request cannot vary."""
    from mari_fx.testing.examples import CoarseRanker

    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(CoarseRanker().eval(), (torch.randn(4, 16), torch.randn(4, 8))), str(path))
    return path


def test_report_of_a_saved_exported_program(tmp_path):
    from torch.export import Dim

    from mari_fx.testing.examples import DictRanker

    example = DictRanker.example_batch(6)
    batch = Dim("batch", min=2)
    ep = torch.export.export(DictRanker().eval(), (example,), dynamic_shapes=({k: {0: batch} for k in example},))
    torch.export.save(ep, str(tmp_path / "dict.pt2"))
    users = ["--user", "x[user_id]", "x[user_age]", "x[hist_item_ids]", "--users", "3", "--candidates", "7", "--json"]
    rc, out, err = run_cli("report", str(tmp_path / "dict.pt2"), *users)
    assert rc == 0, err
    data = json.loads(out)
    # the ATen graph: layers are named after their nodes; the numbers are those of the module
    assert [(l["name"], l["action"]) for l in data["layers"]] == [
        ("linear", "hoisted"), ("linear_1", "split"), ("linear_2", "kept")]
    split = data["layers"][1]
    assert (split["user_columns"], split["item_columns"]) == (32, 9)
    assert split["flops_before"] == 2 * 32 * 7 * 41 and split["flops_after"] == 2 * 32 * (3 * 32 + 7 * 9)
    assert data["flops"]["before"] == mari_fx.count_flops(DictRanker().eval(), DictRanker.example_batch(7))


def test_report_lists_the_op_that_blocked_a_rewrite(factory_file):
    rc, out, err = run_cli("report", f"{factory_file}:make", "--user", "user", "--candidates", "100")
    assert rc == 0, err
    refused = re.search(r"^mean\s+Tensor\.mean\s+(\S+)\s+reduces over the batch dimension", out, re.M)
    assert refused, out
    rows = table_rows(out)
    assert rows["tower"][5] == "hoisted" and rows["head"][5] == "kept"
    assert rows["head"][-2:] == (2 * 100 * 40, 2 * 100 * 40)
    assert "split layers: none" in out


def test_module_form_of_target_imports_from_the_working_directory(factory_file, monkeypatch, capsys):
    monkeypatch.chdir(factory_file.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(factory_file.parent))])
    assert main(["report", "my_factories:make", "--user", "user", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["node"], r["op"]) for r in data["refused"]] == [("mean", "Tensor.mean")]
    assert "batch" in data["refused"][0]["reason"] and data["refused"][0]["location"]


@pytest.mark.parametrize("args, reason", [
    (["report", "{f}:loops", "--user", "user"], "TraceError: torch.fx cannot trace Loops"),
    (["report", "{static}", "--user", "user"], "cannot re-capture"),
])
def test_cannot_trace_or_bad_arguments_exit_2_with_one_line(factory_file, static_program, args, reason):
    rc, out, err = run_cli(*[a.format(f=factory_file, static=static_program, d=factory_file.parent) for a in args])
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("mari-fx: error: ") and reason in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, reason", [
    (["report", "mari_fx.testing.factories:coarse_ranker", "--user", "user", "--users", "5", "--candidates", "2"],
     "need 1 <= --users <= --candidates"),
    (["report", "mari_fx.testing.factories:coarse_ranker"], "the following arguments are required: --user"),
    (["report", "mari_fx.testing.factories:coarse_ranker", "--user", "nope"], "names argument 'nope'"),
    (["report", "{d}/missing.pt2", "--user", "user"], "no such file"),
    (["report", "no_such_module_xyz:make", "--user", "user"], "cannot import 'no_such_module_xyz'"),
    (["report", "mari_fx.testing.factories:nothing", "--user", "user"], "has no attribute 'nothing'"),
    (["report", "mari_fx.testing.factories", "--user", "user"], "must be 'package.module:function'"),
    (["report", "{f}:not_a_tuple", "--user", "user"], "returned Centered; it must return (model, example_args)"),
    (["report", "{f}:make", "--user", "user", "--candidates", "ten"], "invalid int value: 'ten'"),
    (["export", "{f}:make", "--user", "user"], "the following arguments are required: --out"),
])
def test_bad_arguments_in_process(factory_file, capsys, argv, reason):
    assert main([a.format(f=factory_file, d=factory_file.parent) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and reason in captured.err


def test_debug_prints_the_traceback(capsys):
    assert main(["report", "mari_fx.testing.factories:coarse_ranker", "--user", "nope", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "DeclarationError" in err


def test_unexpected_errors_exit_1(monkeypatch, capsys):
    import mari_fx.report.build

    def boom(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(mari_fx.report.build, "build_report", boom)
    assert main(["report", "mari_fx.testing.factories:coarse_ranker", "--user", "user"]) == 1
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: boom" in err and err.count("\n") == 1


def test_no_split_keeps_the_fusion_layer(capsys):
    assert main(["report", "mari_fx.testing.factories:coarse_ranker", "--user", "user", "--no-split", "--json",
                 "--candidates", "10"]) == 0
    data = json.loads(capsys.readouterr().out)
    fusion = next(l for l in data["layers"] if l["name"] == "fusion.0")
    assert data["split_layers"] == [] and fusion["action"] == "kept" and fusion["reason"] == "split_matmuls=False"
    assert fusion["flops_after"] == fusion["flops_before"] == 2 * 64 * 10 * 40


def test_console_script_entry_point():
    scripts = {ep.name: ep for ep in metadata.entry_points(group="console_scripts")}
    assert scripts["mari-fx"].value == "mari_fx.cli:main"
    assert scripts["mari-fx"].load() is main


@pytest.mark.parametrize("module", ["mari_fx.cli", "mari_fx.report.build", "mari_fx.testing.factories"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
