"""Every shell command block of README.md and docs/*.md runs, in a scratch copy of the repository.

A block is a fenced code block whose info string is `bash`, `sh` or `console` (of a `console` block, the lines that
start with `$ ` are the commands; the others are output, not checked). One test per file runs its blocks in order, in
one copy of the repository, so a block may use what an earlier block of the same file wrote. Each block runs with
`bash -e -o pipefail`, with this Python's scripts (`hlsa`, `python3`) first on PATH and the Hugging Face libraries
offline.

HTML comment lines right before a block's opening fence (invisible in the rendered page) tell this test what to do
with it:

* `<!-- docs-test: skip gpu -->`: the block needs a CUDA GPU; skipped.
* `<!-- docs-test: skip network -->`: the block downloads or installs packages, data or checkpoints; skipped.
* `<!-- docs-test: replace "OLD" "NEW" -->`: run the block with the text OLD replaced by NEW (one pair per line,
  repeatable; OLD must occur in the block). For commands whose documented size takes too long for CI (training
  steps, samples, lengths): the reader sees the real command, CI runs the same command smaller.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGUAGES = {"bash", "sh", "console"}
SKIP_REASONS = {"gpu": "needs a CUDA GPU", "network": "downloads or installs from the network"}
MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
REPLACE = re.compile(r'replace\s+"((?:[^"\\]|\\.)*)"\s+"((?:[^"\\]|\\.)*)"$')
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
TIMEOUT_S = 600  # per block; together they take a few minutes on 2 cores
# What a block must not touch or need from the repository copy (caches, virtual environments, git metadata).
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "runs", ".whl", "__pycache__", "*.egg-info", ".*_cache")


@dataclass
class Block:
    doc: Path
    name: str  # file:line of the opening fence
    language: str
    text: str
    skip: str | None = None
    replacements: list[tuple[str, str]] = field(default_factory=list)

    def script(self) -> str:
        text = self.text
        if self.language == "console":
            text = "\n".join(line[2:] for line in text.splitlines() if line.startswith("$ "))
        for old, new in self.replacements:
            text = text.replace(old, new)
        return text


def _directives(comments: list[str], where: str) -> tuple[str | None, list[tuple[str, str]]]:
    skip, replacements = None, []
    for comment in comments:
        if comment.startswith("skip "):
            skip = comment.removeprefix("skip ").strip()
            if skip not in SKIP_REASONS:
                raise ValueError(f"{where}: unknown skip reason {skip!r}; known: {sorted(SKIP_REASONS)}")
        elif found := REPLACE.match(comment):
            replacements.append(tuple(s.replace('\\"', '"') for s in found.groups()))
        else:
            raise ValueError(f"{where}: unknown docs-test directive {comment!r}")
    return skip, replacements


def extract_blocks(doc: Path, root: Path = REPO) -> list[Block]:
    """The command blocks of one Markdown file (named by their path under `root` and line), with the directives of
    the comment lines right above each."""
    lines = doc.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence)), len(lines))
        if language in LANGUAGES:
            comments, j = [], i - 1
            while j >= 0 and (found := MARKER.fullmatch(lines[j].strip())):
                comments.insert(0, found.group(1))
                j -= 1
            where = f"{doc.relative_to(root)}:{i + 1}"
            skip, replacements = _directives(comments, where)
            block = Block(doc, where, language, "\n".join(lines[i + 1 : end]), skip, replacements)
            missing = [old for old, _ in replacements if old not in block.text]
            if missing:
                raise ValueError(f"{where}: replace target(s) {missing} not in the block")
            blocks.append(block)
        i = end + 1
    return blocks


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def test_blocks_are_found() -> None:
    """The extraction sees the documentation's command blocks (a broken fence pattern would silently pass), and
    every directive is valid (extract_blocks raises otherwise)."""
    blocks = [block for doc in DOCS for block in extract_blocks(doc)]
    names = {block.name for block in blocks}
    assert any(name.startswith("README.md:") for name in names)
    assert any(name.startswith("docs/training.md:") for name in names)
    assert any(block.skip is None for block in blocks)


def test_directives_are_parsed(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        '<!-- docs-test: replace "--steps 200" "--steps 2" -->\n```bash\nhlsa train --steps 200\n```\n\n'
        "<!-- docs-test: skip gpu -->\n```sh\nnvidia-smi\n```\n\n```console\n$ echo hi\nhi\n```\n\n```python\nx\n```\n"
    )
    first, second, third = extract_blocks(doc, root=tmp_path)
    assert first.script() == "hlsa train --steps 2" and first.skip is None and first.name == "x.md:2"
    assert second.skip == "gpu" and third.script() == "echo hi"
    doc.write_text('<!-- docs-test: replace "absent" "x" -->\n```bash\nls\n```\n')
    with pytest.raises(ValueError, match="not in the block"):
        extract_blocks(doc, root=tmp_path)


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(REPO)) for doc in DOCS])
def test_doc_blocks_run(doc: Path, tmp_path: Path) -> None:
    """The file's blocks in order, in one copy of the repository (a block may use an earlier block's files); every
    failing block is reported, with the end of its output."""
    blocks = extract_blocks(doc)
    skipped = [f"{block.name} ({SKIP_REASONS[block.skip]})" for block in blocks if block.skip]
    print("skipped:", ", ".join(skipped) or "none")
    if all(block.skip for block in blocks):
        pytest.skip(f"no block to run in {doc.name}")
    work = tmp_path / "repo"
    shutil.copytree(REPO, work, ignore=NOT_COPIED, symlinks=True)
    failures = []
    for block in (block for block in blocks if not block.skip):
        proc = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block.script()],
            cwd=work, env=_environment(), capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
        if proc.returncode != 0:
            failures.append(
                f"{block.name} failed (status {proc.returncode}):\n{block.script()}\n--- stdout\n{proc.stdout[-2000:]}"
                f"\n--- stderr\n{proc.stderr[-2000:]}"
            )
    assert not failures, "\n\n".join(failures)
