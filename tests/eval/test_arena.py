"""`hlsa eval arena` end to end on untrained tiny checkpoints: the recall task on a short MQAR recipe, passkey and
needle prompts and perplexity on the byte tokenizer's text checkpoints, and bad options refused before any model
loads."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

import hlsa.loading
from hlsa import demo
from hlsa.cli import main
from hlsa.errors import UsageError
from hlsa.eval import arena, arena_tasks
from hlsa.eval.haystack import essay_sentences

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "demo"


def _essay(tmp_path: Path, docs: int = 3) -> Path:
    """A .jsonl of `docs` essay documents of about 1,000 characters (byte tokens) each."""
    import random

    path = tmp_path / "docs.jsonl"
    rows = [json.dumps({"text": " ".join(essay_sentences(12, random.Random(i)))}) for i in range(docs)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _arena(capsys: pytest.CaptureFixture[str], argv: list[str], out: Path) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["eval", "arena", *argv, "--threads", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    return json.loads(out.read_text()), captured.out + captured.err


def test_arena_policies_are_the_eviction_policies() -> None:
    from hlsa.layers.eviction import POLICIES

    assert arena.ARENA_POLICIES == POLICIES


def test_checkpoint_names_tell_apart_folders_of_the_same_name(tmp_path: Path) -> None:
    paths = [str(tmp_path / "runs" / "a" / "model"), str(tmp_path / "runs" / "b" / "model"), str(tmp_path / "lte")]
    assert list(arena.checkpoint_names(paths).values()) == ["a/model", "b/model", "lte"]
    same = str(tmp_path / "x" / "model")
    assert arena.checkpoint_names([same, same]) == {same: "model"}  # one checkpoint named twice is one checkpoint


def test_settings_put_the_window_policy_at_budget_zero_only() -> None:
    assert arena.settings(["learned", "window"], [0, 8]) == [
        ("window", 0),
        ("learned", 8),
        ("learned", None),
    ]
    assert arena.settings(["random"], [0, 4]) == [("window", 0), ("random", 4)]
    assert arena.settings(["window", "oracle"], [16]) == [("window", 0), ("oracle", 16), ("oracle", None)]
    # Without a router: no learned, and no ceiling (the model as trained is).
    assert arena.settings(["learned", "h2o", "oracle"], [0, 8], router=False) == [
        ("window", 0),
        ("h2o", 8),
        ("oracle", 8),
    ]


def test_arena_runs_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hlsa.config import HybridConfig
    from hlsa.model import HybridForCausalLM
    from hlsa.tokenizer import task_tokenizer
    from hlsa.train.tasks import MQAR

    configs = demo.arch_configs({"layers": 2, "lte_buffer": 16})
    for name in ("gdn_lte", "transformer"):
        HybridForCausalLM(HybridConfig(**configs[name])).save_pretrained(tmp_path / name)
        # recall checks that a checkpoint carries the recipe's task tokenizer
        task_tokenizer(MQAR(seq_len=64, vocab=256, num_pairs=6, num_queries=4)).save_pretrained(tmp_path / name)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[data]\nseq_len = 64\ntask_vocab = 256\nnum_pairs = 6\nnum_queries = 4\n[demo]\nwindow = 16\n")
    parser = argparse.ArgumentParser()
    arena.add_arena_parser(parser.add_subparsers())
    out = tmp_path / "res" / "arena.json"
    args = parser.parse_args(
        [
            "arena", str(tmp_path / "gdn_lte"), str(tmp_path / "transformer"), "--budgets", "0,4,8",
            "--examples", "2", "--recipe", str(recipe), "--threads", "1", "--out", str(out),
        ]
    )  # fmt: skip
    assert args.func(args) == 0
    doc = json.loads(out.read_text())
    assert list(doc["results"]) == ["recall"] and doc["tasks"]["recall"]["metric"] == "beyond_window"
    got = [(r["name"], r["policy"], r["budget"]) for r in doc["results"]["recall"]]
    policies = [p for p in arena.ARENA_POLICIES if p != "snapkv"]  # no prompt to compress in recall
    lte = [("gdn_lte", p, b) for p, b in arena.settings(policies, [0, 4, 8])]
    full = [("transformer", p, b) for p, b in arena.settings(policies, [0, 4, 8], router=False)]
    assert got == [*lte, *full, ("transformer", "reference", None)]
    assert ("transformer", "h2o", 8) in got and ("transformer", "learned", 8) not in got
    rows = {(r["policy"], r["budget"]): r for r in doc["results"]["recall"] if r["name"] == "gdn_lte"}
    full_rows = {(r["policy"], r["budget"]): r for r in doc["results"]["recall"] if r["name"] == "transformer"}
    sinks = configs["gdn_lte"]["lte"]["sink_size"]
    assert rows["learned", 8]["buffer_size"] == sinks + 8 and rows["learned", None]["buffer_size"] == 64
    # Bytes grow with the buffer and do not depend on the policy, except for the memory a stateful one keeps:
    # delta_write's D x D float32 per kv head of each LTE layer.
    assert rows["window", 0]["cache_bytes"] < rows["random", 4]["cache_bytes"] < rows["random", 8]["cache_bytes"]
    assert rows["oracle", 8]["cache_bytes"] == rows["key_norm", 8]["cache_bytes"]
    cfg = HybridConfig(**configs["gdn_lte"])
    memory = len(cfg.lte_layers) * cfg.lte["num_kv_heads"] * cfg.lte["head_dim"] ** 2 * 4
    assert rows["delta_write", 8]["cache_bytes"] == rows["key_norm", 8]["cache_bytes"] + memory
    # The transformer's constant caches: sinks + window + budget slots, below its full cache at the task's length.
    assert full_rows["h2o", 8]["buffer_size"] == arena.ATTN_SINKS + 8
    assert full_rows["window", 0]["cache_bytes"] < full_rows["tova", 8]["cache_bytes"]
    assert full_rows["tova", 8]["cache_bytes"] == full_rows["oracle", 8]["cache_bytes"]
    assert full_rows["tova", 8]["cache_bytes"] < full_rows["reference", None]["cache_bytes"]
    for r in doc["results"]["recall"]:
        assert sum(r["queries"].values()) == 2 * 4 and 0 <= r["beyond_window"] <= 1
    assert "| gdn_lte | key_norm | 4 |" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 1000
    with pytest.raises(UsageError, match="--policies"):
        arena.run_cli(parser.parse_args(["arena", str(tmp_path / "gdn_lte"), "--policies", "h3o"]))
    with pytest.raises(UsageError, match="--policies: snapkv runs on none of --tasks recall"):
        arena.run_cli(parser.parse_args(["arena", str(tmp_path / "gdn_lte"), "--policies", "snapkv"]))


def test_ppl_beyond_the_window_and_tasks_that_fit_some_checkpoints(
    tiny_lte_dir: Path, tiny_attn_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _essay(tmp_path)
    gdn = str(SHIPPED / "gdn")  # an MQAR checkpoint: recall fits it, ppl does not; the text ones the other way round
    argv = [gdn, str(tiny_lte_dir), str(tiny_attn_dir), "--tasks", "recall,ppl", "--examples", "2", "--text", str(text)]
    argv += ["--policies", "window,random,key_norm,h2o,tova,oracle", "--budgets", "0,128", "--block-size", "128"]
    doc, printed = _arena(capsys, argv, tmp_path / "arena.json")
    assert doc["window"] == 8  # the LTE layers' W (configs/tiny/gdn_lte.json)
    assert [(s["task"], Path(s["checkpoint"]).name) for s in doc["skipped"]] == [
        ("recall", tiny_lte_dir.name),
        ("recall", tiny_attn_dir.name),
        ("ppl", "gdn"),
    ]
    assert re.search(r"recall skips .*not that of the recipe's MQAR task", printed)
    assert re.search(r"ppl skips .*gdn: its tokenizer is a closed vocabulary of 256 symbols", printed)
    assert [(r["name"], r["policy"]) for r in doc["results"]["recall"]] == [("gdn", "reference")]
    info = doc["tasks"]["ppl"]
    assert info["metric"] == "beyond_window" and info["higher_is_better"] is False and info["cache_length"] == 128
    rows = doc["results"]["ppl"]
    assert {r["name"] for r in rows} == {tiny_lte_dir.name, tiny_attn_dir.name}
    for name in (tiny_lte_dir.name, tiny_attn_dir.name):
        mine = [r for r in rows if r["name"] == name]
        for r in mine:
            assert r["documents"] == 3 and r["tokens"]["within"] == 3 * 9 and r["tokens"]["beyond"] == 3 * 118
            assert 1 < r["beyond_window"] < 1000 and 1 < r["overall"] < 1000
            # Tokens up to W + 1 see the whole document through the window alone: no policy changes them.
            assert r["within_window"] == pytest.approx(mine[0]["within_window"], rel=1e-4)
    attn = {(r["policy"], r["budget"]): r for r in rows if r["name"] == tiny_attn_dir.name}
    full = attn["reference", None]["beyond_window"]
    # 128 buffer slots hold every older token of a 128-token block: every scoring policy keeps all, which is the
    # model as trained; the window alone does not.
    for policy in ("random", "key_norm", "h2o", "tova", "oracle"):
        assert attn[policy, 128]["beyond_window"] == pytest.approx(full, rel=1e-4), policy
    assert abs(attn["window", 0]["beyond_window"] - full) > 1e-3 * full
    assert attn["window", 0]["cache_bytes"] < attn["h2o", 128]["cache_bytes"]
    assert "ppl: perplexity beyond W (lower is better)" in printed and "| ppl | ppl > W |" in printed
    assert (tmp_path / "arena.png").stat().st_size > 1000


def test_passkey_and_needle_end_to_end(
    tiny_lte_dir: Path, tiny_attn_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(tiny_lte_dir), str(tiny_attn_dir), "--tasks", "passkey,needle", "--lengths", "512", "--depths", "50"]
    argv += ["--samples", "1", "--policies", "learned,window,snapkv,oracle", "--budgets", "0,4"]
    doc, printed = _arena(capsys, argv, tmp_path / "arena.json")
    assert list(doc["results"]) == ["passkey", "needle"] and doc["skipped"] == []
    assert doc["tasks"]["passkey"]["niah_task"] == "niah_single_1"
    assert doc["tasks"]["needle"]["niah_task"] == "niah_single_2"
    for task in ("passkey", "needle"):
        got = [(r["name"], r["policy"], r["budget"]) for r in doc["results"][task]]
        lte, attn = tiny_lte_dir.name, tiny_attn_dir.name
        assert got == [
            (lte, "window", 0), (lte, "learned", 4), (lte, "snapkv", 4), (lte, "oracle", 4), (lte, "learned", None),
            (lte, "oracle", None), (attn, "window", 0), (attn, "snapkv", 4), (attn, "oracle", 4),
            (attn, "reference", None),
        ]  # fmt: skip
        for r in doc["results"][task]:
            assert r["prompts"] == 1 and list(r["by_length"]) == ["512"]
            assert r["accuracy"] in (0.0, 1.0) and r["by_length"]["512"] == r["accuracy"]
        ceiling = next(r for r in doc["results"][task] if r["budget"] is None)
        assert ceiling["buffer_size"] == 512  # a buffer for every token of the longest prompt
        assert f"{task}: exact match (higher is better)" in printed
    assert "| exact match | @512 |" in printed


def test_retrieval_scores_exact_matches_by_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accuracy is the exact-match fraction over every prompt, and by length; the oracle decodes without a cache."""
    from hlsa.eval import niah
    from hlsa.tokenizer import byte_tokenizer

    task = arena_tasks.Passkey(8, [1024, 512], [25.0, 75.0], 1)
    tokenizer = byte_tokenizer()
    samples = niah.make_samples(["niah_single_1"], tokenizer=tokenizer, lengths=task.lengths, depths=task.depths,
                                tokens_to_generate=arena_tasks.ANSWER_TOKENS, progress=False)  # fmt: skip
    calls = []

    def answer(model: object, tok: object, prompts: list[str], **kwargs: object) -> list[str]:
        calls.append(kwargs["use_cache"])
        # right at 512 tokens; at 1024, right at depth 25 and a number of too few digits at depth 75
        by_prompt = {s.prompt: s for s in samples}
        return [
            f" {by_prompt[p].outputs[0]}." if by_prompt[p].max_length == 512 or by_prompt[p].depth == 25.0 else " 12"
            for p in prompts
        ]

    monkeypatch.setattr(niah, "generate_predictions", answer)
    result = task.evaluate(None, (tokenizer, samples), "tova")
    assert result == {"accuracy": 0.75, "by_length": {"512": 1.0, "1024": 0.5}, "prompts": 4}
    task.evaluate(None, (tokenizer, samples), "oracle")
    assert calls == [True, False]


def test_beyond_window_weights_buckets_by_their_queries() -> None:
    result = {"accuracy": {"a": 1.0, "b": 0.5, "c": 0.0}, "queries": {"a": 10, "b": 2, "c": 6}}
    assert arena_tasks.beyond_window(result) == pytest.approx(1 / 8)


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusals below must come before the evaluation: loading a model fails the test."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model loaded before the options were checked")

    monkeypatch.setattr(hlsa.loading, "load_model", fail)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tasks", "recall,passkye"], r"--tasks: unknown or empty \['passkye'\]"),
        (["--tasks", "ppl"], r"--tasks ppl needs --text PATH"),
        (["--tasks", "ppl", "--text", "missing.txt"], r"--text missing.txt: expected an existing \.txt file"),
        (["--tasks", "ppl", "--text", "{essay}", "--block-size", "10"], r"--block-size 10 .* exceed W \+ 2 = 10"),
        (["--tasks", "passkey", "--lengths", "8"], r"--lengths: token counts above the window W = 8"),
        (["--tasks", "passkey", "--lengths", "0,512"], r"--lengths: token counts above the window"),
        (["--tasks", "passkey", "--lengths", "-512"], r"--lengths: token counts above the window"),
        (["--tasks", "needle", "--lengths", "1k"], r"--lengths: comma-separated ints expected"),
        (["--tasks", "needle", "--lengths", "64"], r"--lengths, needle on .*: max_length=64 leaves no room"),
        (["--tasks", "needle", "--depths", "50,150"], r"--depths: percentages in \[0, 100\]"),
        (["--tasks", "passkey", "--samples", "0"], r"--samples must be >= 1"),
        (["--tasks", "ppl", "--text", "{essay}", "--documents", "0"], r"--documents must be >= 1"),
        (["--tasks", "ppl,recall", "--text", "{essay}", "--policies", "snapkv"], r"--policies: snapkv runs on none"),
        (["--tasks", "recall"], r"--tasks recall fits none of the checkpoints .*MQAR task"),
        (["--budgets", "-1"], r"--budgets: non-negative"),
        (["--window", "0"], r"--window must be >= 1"),
    ],
)
def test_bad_options_are_refused_before_any_model_loads(
    flags: list[str], message: str, tiny_lte_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model
) -> None:
    flags = [f.replace("{essay}", str(_essay(tmp_path))) for f in flags]
    assert main(["eval", "arena", str(tiny_lte_dir), *flags, "--out", str(tmp_path / "a.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hlsa: error: ") and re.search(message, err) and "Traceback" not in err, err


def test_text_tasks_refuse_a_task_model_and_short_documents(
    tiny_lte_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model
) -> None:
    argv = ["eval", "arena", str(SHIPPED / "gdn_lte"), "--tasks", "passkey", "--out", str(tmp_path / "a.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"--tasks passkey fits none of the checkpoints .*closed vocabulary of 256 symbols", err), err
    (tmp_path / "short.txt").write_text("Too short.")
    argv = ["eval", "arena", str(tiny_lte_dir), "--tasks", "ppl", "--text", str(tmp_path / "short.txt")]
    assert main([*argv, "--out", str(tmp_path / "a.json")]) == 2
    assert re.search(r"no document has more than W \+ 2 = 10 tokens", capsys.readouterr().err)
