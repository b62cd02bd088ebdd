"""The CLI's surface: --version, defaults in every --help, user errors as one `error:` line with exit code 2."""
import subprocess
import sys

import pytest
from helpers import ROOT

import dpar.__main__ as cli
import dpar.pipeline.evaluate as evaluate_command
import dpar_kernels as dk


def _run(*args):
    return subprocess.run([sys.executable, "-m", "dpar", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_version():
    result = _run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"dpar-kernels {dk.__version__}"


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "default: " in text and "(default: None)" not in text


def test_evaluate_with_nothing_to_do_fails():
    result = _run("evaluate")
    assert result.returncode == 2
    assert result.stderr.startswith("error: nothing to evaluate") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_missing_file_is_one_line():
    result = _run("evaluate", "--patches", "/nonexistent/patches.pt")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "/nonexistent/patches.pt" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("error", [ValueError("bad --threshold\nsecond line"), FileNotFoundError("no such file"),
                                   dk.BackendUnavailableError("backend 'cuda' cannot run"),
                                   ModuleNotFoundError("No module named 'torch_fidelity'")])
def test_user_errors_exit_2_with_one_line(error, monkeypatch, capsys):
    def fail(args):
        raise error

    monkeypatch.setattr(evaluate_command, "main", fail)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: " + " ".join(str(error).split()) + "\n"


def test_bugs_keep_their_traceback(monkeypatch):
    def fail(args):
        raise AssertionError("a bug")

    monkeypatch.setattr(evaluate_command, "main", fail)
    with pytest.raises(AssertionError, match="a bug"):
        cli.main(["evaluate"])


def test_debug_env_reraises_user_errors(monkeypatch):
    def fail(args):
        raise ValueError("bad input")

    monkeypatch.setattr(evaluate_command, "main", fail)
    monkeypatch.setenv("DPAR_DEBUG", "1")
    with pytest.raises(ValueError, match="bad input"):
        cli.main(["evaluate"])
