"""What both demos share: a heading per step, and a failure told in one line."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run_story(main: Callable[[Path], None], prefix: str) -> None:
    """Run ``main`` in a new work directory, removed afterwards unless the story failed.

    A failure is one line on stderr, ``demo: <what failed> (logs under <work>)``, and
    exit status 1: the processes' logs stay for a look, a traceback would only hide
    them. Ctrl-C stops everything (``main`` cleans up on the way out) with status 130.
    """
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        main(work)
    except KeyboardInterrupt:
        shutil.rmtree(work, ignore_errors=True)
        sys.exit(130)
    except Exception as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        print(f"demo: {lines[0].rstrip(':')} (logs under {work})", file=sys.stderr)
        sys.exit(1)
    shutil.rmtree(work, ignore_errors=True)
