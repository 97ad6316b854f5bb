"""jigsaw_ext.files.emit_json, how every benchmark script ends: its JSON on stdout and, atomically, in --out."""

from __future__ import annotations

import json

from jigsaw_ext.files import emit_json


def test_prints_and_writes_the_same_json_and_leaves_no_temporary(tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("old")
    assert emit_json({"a": [1, 2], "b": {"c": 0.5}}, str(out)) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) == {"a": [1, 2], "b": {"c": 0.5}}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert emit_json({"x": 1}, None) == 0 and json.loads(capsys.readouterr().out) == {"x": 1}
