"""scripts/phase.sh (the phases of scripts/setup.sh): one line per phase; a failing phase shows its output's tail."""
import subprocess

from helpers import ROOT


def _phase(command: str) -> subprocess.CompletedProcess:
    script = f'set -euo pipefail; source scripts/phase.sh; phase "doing it" "about 1 s" {command}; echo after'
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_phase_prints_one_line_and_keeps_the_output_quiet():
    result = _phase("bash -c 'echo noisy pip output'")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["setup: doing it (about 1 s) ... done in 0 s", "after"]


def test_a_failing_phase_shows_the_tail_of_its_output_and_stops():
    result = _phase("bash -c 'for i in $(seq 1 100); do echo line $i; done; echo \"error: the compiler said no\"; "
                    "exit 3'")
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and "after" not in lines
    assert lines[0] == "setup: doing it (about 1 s) ... FAILED after 0 s; the last lines of its output:"
    assert lines[-1] == "error: the compiler said no" and "line 42" in lines and "line 41" not in lines  # 60 lines
