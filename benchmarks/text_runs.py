"""Train the real-text comparison (GDN, GDN+SWA, GDN+LTE, GDN+attention, Transformer) side by side on one device.

Every run is `hlsa train` with the shared recipe (`configs/train/text-2k.toml`) and one model config of
`configs/text/`, one process each, all started at once. At `--time-limit` seconds the runs still going get SIGTERM,
which makes `hlsa train` checkpoint the current step and exit; a run that finished wrote its export. Then the
results are packed into a few files (at most 8, of 16 MiB each, small enough to travel back from a remote GPU
machine): one `.tar.gz` per architecture holding each run's model (its export, or its latest checkpoint without the
optimizer state; bf16 weights except for the runs of `--fp32-runs`), tokenizer, `log.jsonl` and console log, plus
`summary.json` (per run: steps done, last loss, exit status, wall time; the commit, versions and device).

The corpus travels as one compressed file (`pack-inputs`; the corpus is not in git), unpacked by `train` before
the runs start:

    PYTHONPATH=src python benchmarks/text_runs.py pack-inputs --corpus runs/corpus --out runs/text-inputs
    PYTHONPATH=src python benchmarks/text_runs.py train --inputs runs/text-inputs --out runs/text \
        --time-limit 420 --pack $OUT --commit SHA
    # the shipped model: one packed run's model, its training log and a validation excerpt, into checkpoints/text
    PYTHONPATH=src python benchmarks/text_runs.py ship --runs runs/text-h100 --run gdn_lte-s0 --corpus runs/corpus
    # a smoke test of the whole path on the CPU
    PYTHONPATH=src python benchmarks/text_runs.py train --inputs runs/text-inputs --out /tmp/t --runs gdn_lte:0 \
        --device cpu --set train.steps=3 --pack /tmp/t/packed
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import git_commit, machine

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/train/text-2k.toml"
ARCHS = tuple(sorted(p.stem for p in (ROOT / "configs" / "text").glob("*.json")))  # a run names its config
# The comparison: three seeds where the question lies (GDN+LTE against GDN+SWA at the same window, and against
# GDN+SWA at W = 128, whose 129 cache slots per layer equal LTE's sinks + window + buffer), one for the references.
DEFAULT_RUNS = ("gdn_lte:0", "gdn_swa128:0", "gdn_swa:0", "gdn:0", "gdn_attn:0", "transformer:0", "gdn_lte:1",
                "gdn_swa128:1", "gdn_lte:2", "gdn_swa128:2", "gdn_swa:1", "gdn_swa:2")  # fmt: skip
CORPUS_FILES = ("train.jsonl", "validation.jsonl", "manifest.json", "tokenizer")
INPUTS_NAME = "corpus.tar.xz"
# The shipped validation excerpt: one document of each kind the corpus holds (a Python manual page, a standard-library
# source, a Django manual page, a PostgreSQL manual page), cut to its first EXCERPT_CHARS characters.
EXCERPT_IDS = (
    "python3.11-doc:usr/share/doc/python3.11/html/library/ipaddress.html",
    "libpython3.11-stdlib:usr/lib/python3.11/sunau.py",
    "python-django-doc:usr/share/doc/python-django-doc/html/ref/forms/validation.html",
    "postgresql-doc-15:usr/share/doc/postgresql-doc-15/html/install-requirements.html",
)
EXCERPT_CHARS = 8000
GRACE_S = 45  # after SIGTERM: the step in flight (well under a second on a GPU), then the checkpoint


@dataclass
class Run:
    arch: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arch}-s{self.seed}"


def parse_runs(spec: str) -> list[Run]:
    """`all` or `arch:seed` items joined by ','."""
    items = DEFAULT_RUNS if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    runs = []
    for item in items:
        arch, _, seed = item.partition(":")
        if arch not in ARCHS or not seed.isdigit():
            raise SystemExit(f"--runs: {item!r} is not ARCH:SEED with ARCH one of {ARCHS}")
        runs.append(Run(arch, int(seed)))
    return runs


# ---------------------------------------------------------------------------------------------------- inputs
def pack_inputs(corpus: Path, out: Path) -> Path:
    """`<out>/corpus.tar.xz`: the corpus splits, manifest and tokenizer (~60 MB of text in ~10 MB)."""
    missing = [f for f in CORPUS_FILES if not (corpus / f).exists()]
    if missing:
        raise SystemExit(f"{corpus} lacks {missing}: build it first with `hlsa corpus --out {corpus}`")
    out.mkdir(parents=True, exist_ok=True)
    path = out / INPUTS_NAME
    with tarfile.open(path.with_suffix(".tmp"), "w:xz", preset=6) as tar:
        for f in CORPUS_FILES:
            tar.add(corpus / f, arcname=f"corpus/{f}")
    path.with_suffix(".tmp").rename(path)
    return path


def unpack_inputs(inputs: Path, out: Path) -> Path:
    """The corpus folder under `out` (unpacked from `inputs/corpus.tar.xz` unless already there)."""
    corpus = out / "corpus"
    if not (corpus / "manifest.json").is_file():
        with tarfile.open(inputs / INPUTS_NAME) as tar:
            tar.extractall(out, filter="data")
    return corpus


# ---------------------------------------------------------------------------------------------------- training
def train_command(run: Run, run_dir: Path, corpus: Path, device: str, sets: list[str]) -> list[str]:
    cmd = [
        sys.executable, "-m", "hlsa.cli", "train", "--options", RECIPE, "--config", f"configs/text/{run.arch}.json",
        "--out", str(run_dir), "--checkpoint.export", str(run_dir / "export"), "--train.seed", str(run.seed),
        "--train.device", device, "--data.source", str(corpus / "train.jsonl"),
        "--data.tokenizer", str(corpus / "tokenizer"), "--log.progress", "false",
    ]  # fmt: skip
    for item in sets:
        key, _, value = item.partition("=")
        cmd += [f"--{key}", value]
    if (run_dir / "latest").is_file():  # a run stopped by an earlier time limit continues exactly
        cmd.append("--resume")
    return cmd


def train_all(runs: list[Run], out: Path, corpus: Path, *, device: str, sets: list[str], time_limit: float) -> dict:
    """Start every run, SIGTERM the ones still going at `time_limit` seconds, wait for their checkpoints."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    env["TOKENIZERS_PARALLELISM"] = "false"  # nine processes of one thread each; rayon pools would oversubscribe
    procs: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    info: dict[str, dict[str, Any]] = {}
    start = time.monotonic()
    for run in runs:
        run_dir = out / run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = train_command(run, run_dir, corpus, device, sets)
        log = (run_dir / "train.log").open("a")
        procs[run.name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log, 0.0)
        info[run.name] = {"arch": run.arch, "seed": run.seed, "command": cmd[1:]}
    stopped = False
    while any(p.poll() is None for p, _, _ in procs.values()):
        elapsed = time.monotonic() - start
        if not stopped and elapsed > time_limit:
            for p, _, _ in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            stopped = True
        if stopped and elapsed > time_limit + GRACE_S:
            for p, _, _ in procs.values():
                if p.poll() is None:
                    p.kill()
        time.sleep(1)
        for name, (p, log, t) in procs.items():
            if p.poll() is not None and not t:
                procs[name] = (p, log, time.monotonic() - start)
    for name, (p, log, t) in procs.items():
        log.close()
        info[name].update(exit_status=p.returncode, wall_s=round(t or time.monotonic() - start, 1))
    return info


# ---------------------------------------------------------------------------------------------------- packing
def model_dir(run_dir: Path) -> Path | None:
    """The model of a run: `<run>/model` in an unpacked pack, else the run's export when it finished, else its latest
    checkpoint (all load with `from_pretrained`); None when there is none."""
    if (run_dir / "model" / "config.json").is_file():
        return run_dir / "model"
    if (run_dir / "export" / "model.safetensors").is_file():
        return run_dir / "export"
    latest = run_dir / "latest"
    return run_dir / latest.read_text().strip() if latest.is_file() else None


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _weights(src: Path, dst: Path, bf16: bool) -> None:
    """`model.safetensors` without the tied output matrix that checkpoints repeat (`from_pretrained` ties it again),
    floating tensors cast to bf16 when `bf16` (halves a run's share of the 64 MiB that comes back)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(src)
    if json.loads((src.parent / "config.json").read_text()).get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    if bf16:
        tensors = {k: v.bfloat16() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, dst, metadata={"format": "pt"})


def pack(
    runs: list[Run], out: Path, dest: Path, info: dict[str, dict[str, Any]], fp32: set[str], commit: str
) -> list[Path]:
    """One gzipped tar per architecture (`<arch>.tar.gz`) and `summary.json` in `dest`; the weights of the runs
    named in `fp32` stay in fp32, the others are cast to bf16."""
    import tempfile

    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for arch in dict.fromkeys(r.arch for r in runs):
        tar_path = dest / f"{arch}.tar.gz"
        with tarfile.open(tar_path, "w:gz") as tar, tempfile.TemporaryDirectory() as tmp:
            for run in (r for r in runs if r.arch == arch):
                run_dir, src = out / run.name, model_dir(out / run.name)
                for f in ("log.jsonl", "train.log"):
                    if (run_dir / f).is_file():
                        tar.add(run_dir / f, arcname=f"{run.name}/{f}")
                if src is None:
                    continue
                for f in sorted(src.iterdir()):
                    if f.name == "model.safetensors":
                        bf16 = run.name not in fp32
                        _weights(f, Path(tmp) / f.name, bf16)
                        tar.add(Path(tmp) / f.name, arcname=f"{run.name}/model/{f.name}")
                        info[run.name]["weights"] = "bf16" if bf16 else "fp32"
                    elif f.suffix in (".json", ".txt", ".model") or f.name.startswith("tokenizer"):
                        tar.add(f, arcname=f"{run.name}/model/{f.name}")
                info[run.name]["model_from"] = src.name
        files.append(tar_path)
    for run in runs:
        log = read_log(out / run.name)
        last = log[-1] if log else {}
        info[run.name].update(steps=last.get("step", 0), last_loss=last.get("loss"), last_ce=last.get("ce"))
    summary = {"machine": machine(commit), "runs": info}
    (dest / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    files.append(dest / "summary.json")
    return files


# ---------------------------------------------------------------------------------------------------- shipping
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json")  # fmt: skip


def ship(run_dir: Path, corpus: Path, dest: Path) -> list[Path]:
    """`dest/<arch>/`: the run's model (fp32 weights: pack it with `--fp32-runs`), tokenizer and training log
    (`train_log.jsonl`), and `dest/validation-excerpt.jsonl` (`EXCERPT_IDS` of the validation split, each cut to
    `EXCERPT_CHARS` characters, with its id)."""
    from safetensors import safe_open

    src = model_dir(run_dir)
    if src is None:
        raise SystemExit(f"{run_dir}: no model (a pack's <run>/model, an export or a checkpoint)")
    with safe_open(src / "model.safetensors", "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    if dtypes != {"F32"}:
        raise SystemExit(f"{src}/model.safetensors holds {sorted(dtypes)}: ship fp32 weights (pack with --fp32-runs)")
    out = dest / run_dir.name.rsplit("-s", 1)[0]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SHIPPED_FILES:
        if (src / name).is_file():
            written.append(out / name)
            written[-1].write_bytes((src / name).read_bytes())
    if (run_dir / "log.jsonl").is_file():
        written.append(out / "train_log.jsonl")
        written[-1].write_bytes((run_dir / "log.jsonl").read_bytes())
    docs = {d["id"]: d["text"] for d in map(json.loads, (corpus / "validation.jsonl").read_text().splitlines())}
    missing = [i for i in EXCERPT_IDS if i not in docs]
    if missing:
        raise SystemExit(f"{corpus}/validation.jsonl lacks {missing}: rebuild it with `hlsa corpus`")
    excerpt = dest / "validation-excerpt.jsonl"
    lines = [json.dumps({"id": i, "text": docs[i][:EXCERPT_CHARS]}, ensure_ascii=False) for i in EXCERPT_IDS]
    excerpt.write_text("\n".join(lines) + "\n")
    return [*written, excerpt]


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("pack-inputs", help="compress the corpus into one file to carry")
    pi.add_argument("--corpus", default="runs/corpus")
    pi.add_argument("--out", default="runs/text-inputs")
    tr = sub.add_parser("train", help="train the runs side by side, stop them at the time limit, pack the results")
    tr.add_argument("--inputs", default="runs/text-inputs", help="folder holding corpus.tar.xz (pack-inputs)")
    tr.add_argument("--out", default="runs/text", help="run folders (resumed when they hold a checkpoint)")
    tr.add_argument("--runs", default="all", help=f"'all' ({','.join(DEFAULT_RUNS)}) or ARCH:SEED,...")
    tr.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    tr.add_argument("--time-limit", type=float, default=420, help="seconds before the runs still going are stopped")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override: train.steps=3")
    tr.add_argument("--pack", default=None, help="write <arch>.tar files and summary.json here (at most 8 files)")
    tr.add_argument(
        "--fp32-runs", default="gdn_lte:0", help="ARCH:SEED,... whose weights are packed in fp32 (others in bf16)"
    )
    tr.add_argument("--commit", default=None, help="the commit to record (default: git HEAD here)")
    sh = sub.add_parser("ship", help="copy one run's model and a validation excerpt into checkpoints/text")
    sh.add_argument("--runs", required=True, help="folder of unpacked runs (<arch>-s<seed>/model) or run folders")
    sh.add_argument("--run", default="gdn_lte-s0", help="the run to ship")
    sh.add_argument("--corpus", default="runs/corpus", help="the corpus folder (for the validation excerpt)")
    sh.add_argument("--dest", default="checkpoints/text")
    args = p.parse_args(argv)
    if args.cmd == "pack-inputs":
        print(pack_inputs(Path(args.corpus), Path(args.out)))
        return 0
    if args.cmd == "ship":
        for f in ship(Path(args.runs) / args.run, Path(args.corpus), Path(args.dest)):
            print(f"{f} {f.stat().st_size / 2**20:.2f} MiB")
        return 0
    runs = parse_runs(args.runs)
    out = Path(args.out).resolve()
    corpus = unpack_inputs(Path(args.inputs), out)
    info = train_all(runs, out, corpus, device=args.device, sets=args.set, time_limit=args.time_limit)
    for name, i in info.items():
        print(f"{name}: exit {i['exit_status']} after {i['wall_s']} s")
    if args.pack:
        fp32 = {r.name for r in parse_runs(args.fp32_runs)}
        files = pack(runs, out, Path(args.pack), info, fp32, git_commit(args.commit))
        for f in files:
            print(f"{f} {f.stat().st_size / 2**20:.1f} MiB")
        if max(f.stat().st_size for f in files) > 16 * 2**20 or sum(f.stat().st_size for f in files) > 60 * 2**20:
            print("warning: over 16 MiB a file or 64 MiB in all: too large to send back", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
