import subprocess
import sys

import pytest
from helpers import ROOT

COMMANDS = ["train", "patchify", "sample", "evaluate", "demo", "ablate", "extract-codes"]


def _run(args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command):
    result = _run(["-m", "dpar", command, "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage: python -m dpar " + command in result.stdout and "--" in result.stdout


def test_top_level_help_and_docstring_list_every_command():
    import dpar.__main__ as cli

    result = _run(["-m", "dpar", "--help"])
    assert result.returncode == 0 and all(c in result.stdout for c in COMMANDS)
    assert sorted(cli.COMMANDS) == sorted(COMMANDS)
    assert all(c in cli.__doc__.split("\n")[0] for c in COMMANDS), cli.__doc__
