"""The README's first command, ``bash deploy/examples/demo.sh``, as a newcomer runs it.

The demo runs from a temporary directory in an environment without PYTHONPATH and
without the virtualenv these tests may run in, and installs the project into a new
virtualenv of its own: nothing it needs comes from this checkout's import path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import spegel_tx
from deploy.examples.story import run_story
from tests.conftest import require
from tests.support.processes import ROOT

DEMO = ROOT / "deploy" / "examples" / "demo.sh"
PASSED_ON = ("HOME", "LANG", "LC_ALL", "TMPDIR", "http_proxy", "https_proxy", "no_proxy")
"""What a newcomer's shell has; PIP_* variables also pass, for the machine's own index."""


def clean_environment(venv: Path) -> dict[str, str]:
    in_venv = sys.prefix != sys.base_prefix  # tests/run.sh runs us in one: leave it out.
    path = [p for p in os.environ["PATH"].split(":") if not (in_venv and p == f"{sys.prefix}/bin")]
    env = {key: value for key, value in os.environ.items() if key in PASSED_ON}
    env |= {key: value for key, value in os.environ.items() if key.startswith("PIP_")}
    return env | {"PATH": ":".join(path), "SPEGEL_TX_DEMO_VENV": str(venv)}


def demo(tmp_path: Path, venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEMO), *args],
        cwd=tmp_path,
        env=clean_environment(venv),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.integration
def test_both_stories_install_what_they_need_then_pass(tmp_path: Path) -> None:
    require("containerd", "ctr", "docker-registry", "skopeo")
    if os.geteuid() != 0:
        pytest.skip("the demo starts containerd, which needs root")
    venv = tmp_path / "venv"

    first = demo(tmp_path, venv)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr
    assert f"==> installing spegel-tx from {ROOT} into {venv}" in first.stdout
    assert f"==> running spegel-tx {spegel_tx.__version__} from {venv}" in first.stdout
    assert "spegel-tx served the node's containerd content" in first.stdout
    assert first.stderr == ""

    mirror = demo(tmp_path, venv, "mirror")
    assert mirror.returncode == 0, mirror.stdout[-3000:] + mirror.stderr
    assert "==> installing" not in mirror.stdout, "what is installed and runs stays"
    for node in ("A", "B", "C"):
        assert f"{node} pulled " in mirror.stdout
    assert "==> stopped every process" in mirror.stdout
    assert mirror.stderr == ""

    installed = subprocess.run(
        [venv / "bin" / "python", "-c", "import spegel_tx; print(spegel_tx.__file__)"],
        cwd=tmp_path,
        env=clean_environment(venv),
        capture_output=True,
        text=True,
    )
    assert installed.stdout.startswith(str(venv)), installed


def test_an_unknown_story_is_refused_with_the_usage(tmp_path: Path) -> None:
    result = demo(tmp_path, tmp_path / "venv", "bogus")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "usage: bash deploy/examples/demo.sh [mirror]\n"
    assert not (tmp_path / "venv").exists()


def test_a_failed_story_is_one_line_and_keeps_its_logs(capsys: pytest.CaptureFixture[str]) -> None:
    kept: list[Path] = []

    def story(work: Path) -> None:
        kept.append(work)
        (work / "node.log").write_text("the node's log\n")
        raise RuntimeError("http://127.1.2.3:4/readyz did not answer within 30s:\nlog tail")

    with pytest.raises(SystemExit) as exited:
        run_story(story, "spegel-demo-test-")
    try:
        assert exited.value.code == 1
        assert capsys.readouterr().err == (
            f"demo: http://127.1.2.3:4/readyz did not answer within 30s (logs under {kept[0]})\n"
        )
        assert (kept[0] / "node.log").read_text() == "the node's log\n"
    finally:
        for path in kept:
            (path / "node.log").unlink()
            path.rmdir()
