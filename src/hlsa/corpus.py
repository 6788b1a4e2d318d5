"""`hlsa corpus`: a real-text training corpus built offline from Debian packages, and a small BPE tokenizer for it.

The packages carry English prose (the Python, Django and PostgreSQL manuals, as HTML) and code (the Python standard
library, its test suite and Django, as `.py` sources). `build_corpus`:

1. `apt-get download`s the packages (no root needed) unless their `.deb`s are already in `<out>/debs`, and unpacks
   each with `dpkg -x` into its own folder;
2. makes one document of each manual page (HTML -> text with the standard library's `html.parser`, dropping the
   navigation bars, sidebars, footers, scripts and the Sphinx permalink marks) and of each `.py` file (as it is),
   in sorted order of `<package>:<path>`;
3. puts a document into the validation split when the SHA-256 of its `<package>:<path>` falls below
   `valid_fraction` (a split by document that does not move when other documents are added or removed);
4. writes `train.jsonl` and `validation.jsonl` (`{"text": ...}` per line, what `hlsa train`'s local `.jsonl`
   source reads) and `manifest.json` (packages, versions, licenses with the full copyright files, document counts,
   SHA-256 of every output);
5. trains a byte-level BPE tokenizer on the training split (`train_tokenizer`) and saves it as a transformers
   tokenizer directory (`<out>/tokenizer`), which `data.tokenizer` accepts and the trainer saves with checkpoints.

Everything is a function of the `.deb` files: the same packages give byte-identical outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from hlsa.errors import UsageError

# Debian bookworm: ~97 MB of HTML and ~38 MB of Python, ~60 MB of text after cleaning.
PACKAGES = (
    "python3.11-doc",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libpython3.11-testsuite",
    "python-django-doc",
    "python3-django",
    "postgresql-doc-15",
)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"}

# Pages that are indexes or search forms, not prose; folders of sources, images and assets.
_SKIP_PAGES = re.compile(r"(^|/)(genindex[^/]*|py-modindex|search|bookindex)\.html$")
_SKIP_DIRS = {"_sources", "_static", "_images", "_downloads"}
# Elements whose whole content is navigation (Sphinx's related bars, sidebars and footers, Django's header, sidebar
# and footer, PostgreSQL's DocBook nav header and footer).
_SKIP_TAGS = {"script", "style", "head", "nav", "form", "button", "select", "template"}
_SKIP_CLASSES = {"related", "sphinxsidebar", "footer", "navheader", "navfooter", "nav", "headerlink", "mobile-nav"}
_SKIP_IDS = {"sidebar", "hd", "ft", "global-nav", "searchbox"}
_SKIP_ROLES = {"navigation", "search"}
_BLOCKS = {
    "p", "div", "br", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "table", "section",
    "blockquote", "ul", "ol", "dl", "hr", "figure", "caption", "article", "main",
}  # fmt: skip
_VOID = {"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"}


class _TextExtractor(HTMLParser):
    """Visible text of a manual page: block elements become line breaks, whitespace collapses outside `<pre>`,
    navigation subtrees (`_SKIP_*`) are dropped whole."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_tag: str | None = None  # the tag name of the navigation subtree being dropped, and its depth
        self.skip_depth = 0
        self.pre = 0

    def _is_nav(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        a = {k: v or "" for k, v in attrs}
        return (
            tag in _SKIP_TAGS
            or bool(_SKIP_CLASSES & set(a.get("class", "").split()))
            or a.get("id", "") in _SKIP_IDS
            or a.get("role", "") in _SKIP_ROLES
        )

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is not None:
            self.skip_depth += tag == self.skip_tag
            return
        if tag not in _VOID and self._is_nav(tag, attrs):
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCKS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append("\t")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip_tag is None:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """The visible prose and code of one manual page, without its navigation (see `_TextExtractor`)."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).split("\n")]
    # Indentation inside <pre> is kept; elsewhere a line's leading space is an artifact of collapsed whitespace.
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text)


def is_validation(doc_id: str, valid_fraction: float) -> bool:
    """Whether a document belongs to the validation split: the SHA-256 of its id, read as a fraction of 2**64."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h < valid_fraction * 2**64


def documents(root: Path, package: str) -> Iterator[tuple[str, str]]:
    """`(doc id, text)` of one unpacked package, sorted by path: manual pages under usr/share/doc as text, `.py`
    sources as they are. Files that are not valid UTF-8 (the test suite has a few, on purpose) are skipped."""
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        if _SKIP_DIRS & set(rel.split("/")):
            continue
        is_page = path.suffix == ".html" and rel.startswith("usr/share/doc/") and not _SKIP_PAGES.search(rel)
        if not (is_page or path.suffix == ".py"):
            continue
        try:
            raw = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        text = html_to_text(raw) if is_page else raw.strip("\n")
        if text.strip():
            yield f"{package}:{rel}", text


def _licenses(copyright_text: str) -> list[str]:
    """The license short names (`BSD-3-Clause`, `GPL-2+ or Artistic`) of a machine-readable (DEP-5) copyright
    file, in order, each once; empty for a free-form file (Python's), whose full text the manifest keeps anyway."""
    name = r"[\w.+-]+(?:[ \t]+(?:or|and|with)[ \t]+[\w.+-]+)*"
    names = re.findall(rf"^License:[ \t]*({name})[ \t]*$", copyright_text, re.M)
    return list(dict.fromkeys(names))


def _copyright(roots: dict[str, Path], package: str) -> tuple[str, str]:
    """(`<package>:<path>`, text) of a package's copyright file, or empty strings. A doc folder that is a symlink
    (libpython3.11-stdlib's points at libpython3.11-minimal's) is followed into the package that owns the target."""
    doc = roots[package] / "usr/share/doc" / package
    if doc.is_symlink():
        target = Path(doc.readlink()).name
        return _copyright(roots, target) if target in roots else ("", "")
    path = doc / "copyright"
    if not path.is_file():
        return "", ""
    return f"{package}:{path.relative_to(roots[package]).as_posix()}", path.read_text(errors="replace")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_debs(packages: list[str], debs: Path) -> list[Path]:
    """The `.deb` of each package in `debs`, downloaded with `apt-get download` when missing (one per package: the
    newest there, so a folder of hand-placed `.deb`s pins the versions)."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not sorted(debs.glob(f"{p}_*.deb"))]
    if missing:
        try:
            subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise UsageError(
                f"apt-get download {' '.join(missing)} failed ({e}); run `apt-get update`, or put the .deb files "
                f"into {debs}"
            ) from e
    found = []
    for p in packages:
        files = sorted(debs.glob(f"{p}_*.deb"))
        if not files:
            raise UsageError(f"no .deb for {p} in {debs}")
        found.append(files[-1])
    return found


def _deb_field(deb: Path, field: str) -> str:
    done = subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def build_corpus(
    out: Path, *, packages: list[str] | None = None, valid_fraction: float = 0.01, vocab_size: int = 4096
) -> dict[str, Any]:
    """Build `<out>/{train,validation}.jsonl`, `<out>/manifest.json` and (`vocab_size > 0`) `<out>/tokenizer`
    from `packages` (default `PACKAGES`); returns the manifest."""
    if not 0 < valid_fraction < 1:
        raise UsageError(f"--valid-fraction must be in (0, 1), got {valid_fraction}")
    packages = list(packages or PACKAGES)
    out.mkdir(parents=True, exist_ok=True)
    debs = fetch_debs(packages, out / "debs")
    roots: dict[str, Path] = {}
    meta = []
    for package, deb in zip(packages, debs):
        root = out / "unpacked" / package
        if not root.is_dir():
            tmp = root.with_name(root.name + ".tmp")
            subprocess.run(["rm", "-rf", str(tmp)], check=True)
            tmp.mkdir(parents=True)
            subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
            tmp.rename(root)
        roots[package] = root
        source = _deb_field(deb, "Source").split(" ")[0] or package  # "python3.11 (3.11.2-6)" -> "python3.11"
        meta.append(
            {"package": package, "version": _deb_field(deb, "Version"), "source": source, "deb": deb.name,
             "sha256": _sha256(deb)}
        )  # fmt: skip
    splits = {"train": {"documents": 0, "chars": 0}, "validation": {"documents": 0, "chars": 0}}
    train, valid = out / "train.jsonl", out / "validation.jsonl"
    with train.open("w", encoding="utf-8") as tr, valid.open("w", encoding="utf-8") as va:
        for package in packages:
            counts: dict[str, int] = {"documents": 0, "chars": 0}
            for doc_id, text in documents(roots[package], package):
                split = "validation" if is_validation(doc_id, valid_fraction) else "train"
                (va if split == "validation" else tr).write(json.dumps({"text": text, "id": doc_id}) + "\n")
                for c in (splits[split], counts):
                    c["documents"] += 1
                    c["chars"] += len(text)
            entry = next(m for m in meta if m["package"] == package)
            entry.update(counts)
    for entry in meta:
        entry["copyright_file"], entry["copyright"] = _copyright(roots, entry["package"])
    for entry in meta:
        # A doc folder linked to a package outside the set (the test suite's points at python3.11's): the
        # copyright file of a package built from the same Debian source is the same file.
        if not entry["copyright"]:
            twin = next((m for m in meta if m["source"] == entry["source"] and m["copyright"]), None)
            if twin is not None:
                entry["copyright_file"], entry["copyright"] = twin["copyright_file"], twin["copyright"]
        entry["licenses"] = _licenses(entry["copyright"])
    for split in splits:
        splits[split]["sha256"] = _sha256(out / f"{split}.jsonl")
    manifest: dict[str, Any] = {
        "description": "Debian manuals (HTML -> text) and Python sources; see hlsa.corpus",
        "valid_fraction": valid_fraction,
        "splits": splits,
        "packages": meta,
    }
    if vocab_size > 0:
        tok = train_tokenizer(_texts(out / "train.jsonl"), vocab_size)
        tok.save_pretrained(out / "tokenizer")
        manifest["tokenizer"] = {"vocab_size": vocab_size, "sha256": _sha256(out / "tokenizer" / "tokenizer.json")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)["text"]


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer of `vocab_size` ids (specials `<pad>`, `<bos>`, `<eos>` first) trained on `texts`,
    as a `transformers.PreTrainedTokenizerFast`. Byte-level: every string encodes, code and odd Unicode included.
    Encoding with special tokens puts `<bos>` first, as `hlsa train` starts every document with it (so a prompt in
    `hlsa generate` looks like the start of a training document)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    if vocab_size < 256 + len(specials):
        raise UsageError(f"--vocab must be at least {256 + len(specials)} (the 256 bytes and the special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


# ---------------------------------------------------------------------------------------------------- command line
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `corpus` to the `hlsa` command."""
    from hlsa.cli import HelpFormatter

    p = subparsers.add_parser(
        "corpus",
        help="build the real-text corpus (Debian manuals and Python sources) and its BPE tokenizer",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="runs/corpus", help="output folder (train.jsonl, validation.jsonl, ...)")
    p.add_argument("--packages", nargs="+", default=list(PACKAGES), help="Debian packages to read")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="share of documents in the validation split")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size (0: no tokenizer)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    manifest = build_corpus(
        Path(args.out), packages=args.packages, valid_fraction=args.valid_fraction, vocab_size=args.vocab
    )
    for split, s in manifest["splits"].items():
        print(f"{split}: {s['documents']} documents, {s['chars'] / 1e6:.1f} M characters")
    return 0
