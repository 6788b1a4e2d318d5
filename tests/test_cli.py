"""The `hlsa` command itself: fast help without torch, `--version`, one-line warnings, and `import hlsa` registering
the Auto classes whichever import comes first."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from hlsa.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "demo"


def python(code: str) -> str:
    """Run `code` in a fresh interpreter (sys.modules as a user's process would have it); returns its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_of_every_command_imports_neither_torch_nor_transformers() -> None:
    commands = [[], ["train"], ["demo"], ["generate"], ["eval"], ["eval", "niah"], ["eval", "ppl"],
                ["eval", "inspect"], ["convert"]]  # fmt: skip
    out = python(
        "import sys\n"
        "import hlsa.cli\n"
        "print('after import:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
        f"for argv in {commands!r}:\n"
        "    try:\n"
        "        hlsa.cli.main([*argv, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('after help:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    assert "after import: []" in out and "after help: []" in out
    out = " ".join(out.split())  # argparse wraps lines at the terminal width
    assert "niah_multikey_3" in out  # eval niah --help lists its tasks
    assert "(default: 1024,2048,4096)" in out and "(default: 2048)" in out  # and its defaults, as ppl does


@pytest.mark.parametrize(
    "first_import",
    [
        "import hlsa",
        "from hlsa.config import HybridConfig",  # transformers is first imported from inside hlsa.config
        "import hlsa.model",
        "import transformers.modeling_utils; import hlsa",  # transformers loaded before hlsa
    ],
)
def test_import_hlsa_registers_the_auto_classes(first_import: str) -> None:
    """Every shipped checkpoint loads through transformers' Auto classes alone."""
    out = python(
        f"{first_import}\n"
        "from pathlib import Path\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        f"for path in sorted(Path({str(SHIPPED)!r}).iterdir()):\n"
        "    model = AutoModelForCausalLM.from_pretrained(path)\n"
        "    tok = AutoTokenizer.from_pretrained(path)\n"
        "    print(type(AutoConfig.from_pretrained(path)).__name__, type(model).__name__, len(tok))\n"
    )
    assert out.splitlines() == ["HybridConfig HybridForCausalLM 256"] * 5


def test_version_is_the_packages() -> None:
    import hlsa

    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert hlsa.__version__ == version
    out = subprocess.run([sys.executable, "-m", "hlsa.cli", "--version"], capture_output=True, text=True).stdout
    assert out.strip() == f"hlsa {version}"


def test_lazy_attributes() -> None:
    import hlsa
    from hlsa.config import HybridConfig

    assert hlsa.HybridConfig is HybridConfig and "HybridForCausalLM" in dir(hlsa)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        hlsa.nothing  # noqa: B018


def test_warnings_of_a_command_are_one_line(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """A command's warning shows its message, not the line of library code that raised it."""
    import hlsa.generate

    def warn_and_stop(args: object) -> int:
        warnings.warn("something to know", UserWarning, stacklevel=2)
        return 0

    monkeypatch.setattr(hlsa.generate, "run", warn_and_stop)
    before = warnings.showwarning
    assert main(["generate", "ckpt", "--prompt", "x"]) == 0
    assert capsys.readouterr().err == "hlsa: warning: something to know\n"
    assert warnings.showwarning is before  # main() called from Python leaves the display as it found it
