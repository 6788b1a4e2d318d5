"""`hlsa corpus`: manual pages lose their navigation, the split is by document and stable, and a build from `.deb`
files is deterministic, with the packages' versions and licenses in its manifest and a tokenizer `hlsa train` loads."""

import argparse
import json
import shutil
import subprocess

import pytest

from hlsa import corpus

PAGE = """<!DOCTYPE html><html><head><title>json</title><script>var x = 1;</script></head><body>
<div class="related" role="navigation"><ul><li><a href="index.html">index</a></li><li>next</li></ul></div>
<div class="body" role="main">
<h1>json — JSON encoder<a class="headerlink" href="#json">¶</a></h1>
<p>JSON is a   lightweight
 data format.</p>
<div class="highlight"><pre>def f(x):
    return x + 1
</pre></div>
<table><tr><td>key</td><td>value</td></tr></table>
<img src="a.png"><br>
</div>
<div class="sphinxsidebar" role="navigation"><div><h3>Table of Contents</h3><ul><li>json</li></ul></div></div>
<div class="footer">&copy; Copyright 2001-2023</div>
</body></html>"""


def test_html_to_text_keeps_prose_and_code_without_navigation():
    text = corpus.html_to_text(PAGE)
    assert text.startswith("json — JSON encoder\n")
    assert "JSON is a lightweight data format." in text
    assert "def f(x):\n    return x + 1" in text  # <pre> keeps its layout
    assert "key\tvalue" in text
    for nav in ("index", "next", "Table of Contents", "Copyright", "¶", "var x"):
        assert nav not in text, nav


def test_nested_navigation_is_dropped_whole():
    html = '<div class="nav"><div><div>menu</div></div>still menu</div><p>body</p><div id="ft"><div>x</div>foot</div>'
    assert corpus.html_to_text(html) == "body"


def test_validation_split_is_by_document_and_about_the_fraction():
    ids = [f"pkg:usr/lib/python3/mod{i}.py" for i in range(20000)]
    chosen = [i for i in ids if corpus.is_validation(i, 0.01)]
    assert 150 < len(chosen) < 250
    assert chosen == [i for i in ids if corpus.is_validation(i, 0.01)]  # a function of the id alone
    assert set(chosen) <= {i for i in ids if corpus.is_validation(i, 0.05)}  # a larger fraction only adds


def _fake_deb(tmp_path, name, files):
    """A `.deb` named `<name>_1.0-1_all.deb` holding `files` ({path: text}) under its root."""
    root = tmp_path / "build" / name
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0-1\nSource: src-{name}\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: test\n"
    )
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(text if isinstance(text, bytes) else text.encode())
    debs = tmp_path / "out" / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(debs / f"{name}_1.0-1_all.deb")],
                   check=True, capture_output=True)  # fmt: skip


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_build_from_debs_is_deterministic_with_manifest_and_tokenizer(tmp_path):
    prose = "The quick brown fox jumps over the lazy dog. " * 40
    _fake_deb(tmp_path, "demo-doc", {
        "usr/share/doc/demo-doc/copyright": "Files: *\nCopyright: 2020 A\nLicense: BSD-3-Clause\n Text.\n",
        **{f"usr/share/doc/demo-doc/html/page{i}.html": PAGE.replace("lightweight", f"light {i} {prose}")
           for i in range(40)},
        "usr/share/doc/demo-doc/html/genindex.html": "<p>index page</p>",
        "usr/share/doc/demo-doc/html/_sources/page0.rst.txt": "source",
    })  # fmt: skip
    _fake_deb(tmp_path, "demo-lib", {
        "usr/share/doc/demo-lib/copyright": "Files: *\nLicense: Expat or GPL-2+\n",
        "usr/lib/python3/demo/__init__.py": "def add(a, b):\n    return a + b\n",
        "usr/lib/python3/demo/bad.py": b"s = '\xff'\n",  # not UTF-8: skipped
        "usr/lib/python3/demo/notes.txt": "not a source file",
    })  # fmt: skip
    out = tmp_path / "out"
    manifest = corpus.build_corpus(out, packages=["demo-doc", "demo-lib"], valid_fraction=0.1, vocab_size=300)

    docs = [json.loads(line) for name in ("train", "validation") for line in (out / f"{name}.jsonl").open()]
    ids = sorted(d["id"] for d in docs)
    assert len(ids) == 41 and "demo-lib:usr/lib/python3/demo/__init__.py" in ids
    assert not any("genindex" in i or "_sources" in i or "bad.py" in i or "notes" in i for i in ids)
    assert manifest["splits"]["validation"]["documents"] == sum(corpus.is_validation(i, 0.1) for i in ids) > 0
    by_name = {p["package"]: p for p in manifest["packages"]}
    assert by_name["demo-doc"]["version"] == "1.0-1" and by_name["demo-doc"]["licenses"] == ["BSD-3-Clause"]
    assert by_name["demo-lib"]["licenses"] == ["Expat or GPL-2+"] and by_name["demo-lib"]["documents"] == 1

    from hlsa.train.data import load_text_tokenizer, make_encoder

    tok = load_text_tokenizer(str(out / "tokenizer"))  # what `data.tokenizer = <dir>` loads
    assert len(tok) == 300 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids_ = make_encoder(tok)("def add(a, b): ü")
    assert ids_[0] == 1 and ids_[-1] == 2 and tok.decode(ids_[1:-1]) == "def add(a, b): ü"
    assert tok("brown fox")["input_ids"][0] == 1  # a prompt starts like a training document

    first = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out / "unpacked")
    again = corpus.build_corpus(out, packages=["demo-doc", "demo-lib"], valid_fraction=0.1, vocab_size=300)
    assert again == first


def test_command_line_builds_into_out(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(corpus, "build_corpus", lambda out, **kw: seen.update(out=out, **kw) or {"splits": {}})
    parser = argparse.ArgumentParser()
    corpus.register(parser.add_subparsers())
    args = parser.parse_args(["corpus", "--out", str(tmp_path), "--vocab", "512", "--packages", "a", "b"])
    assert args.func(args) == 0
    assert seen == {"out": tmp_path, "packages": ["a", "b"], "valid_fraction": 0.01, "vocab_size": 512}
