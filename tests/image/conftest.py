"""The image, built once per test session by deploy/image/build.sh (about a minute)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.image import ARCHIVE_ENV, BuiltImage, build_image, given_image


@pytest.fixture(scope="session")
def spegel_tx_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """``bash deploy/image/build.sh`` of the working tree, or the archive named by
    SPEGEL_TX_IMAGE_ARCHIVE (to rerun the tests without rebuilding)."""
    directory = tmp_path_factory.mktemp("image")
    if os.environ.get(ARCHIVE_ENV):
        return given_image(Path(os.environ[ARCHIVE_ENV]), directory)
    if os.geteuid() != 0:
        pytest.skip("building the image needs root (mmdebstrap --mode=root, chroot)")
    missing = [
        tool for tool in ("mmdebstrap", "umoci", "dpkg-deb", "git") if not shutil.which(tool)
    ]
    if missing:
        pytest.skip(
            f"building the image needs {', '.join(missing)} (apt-get install mmdebstrap umoci git)"
        )
    return build_image(directory)
