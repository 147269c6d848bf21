"""Install spegel-tx into an image's root file system, run there by the image's own python3.

deploy/image/build.sh runs it in the Debian root it built (chroot), and deploy/Dockerfile
in its Debian stage, so both images get the same files in the same places: Debian's
/usr/bin/python3, the packages under /usr/local/lib/python3.11/dist-packages, the
commands in /usr/local/bin. One stage per image layer:

    python3 install.py system        # user spegel-tx (10001), the stdlib's byte-code
    python3 install.py dependencies  # the wheels pinned in requirements.txt, hashes checked,
                                     # without their test suites
    python3 install.py package       # spegel-tx's wheel, Twisted's plugin cache, byte-code

Every file it installs is read from this file's directory (nothing is downloaded): the
pip wheel, which runs from the wheel and is not installed, requirements.txt and the
wheels it pins, and spegel-tx's wheel. Everything is written before
the image runs with a read-only root file system: byte-code is compiled with
unchecked hashes (never rewritten, nor compared with the sources' times), and the
plugin cache is made newer than every plugin module, else Twisted would scan the
plugins at each start and fail to save the result.
"""

from __future__ import annotations

import compileall
import os
import pickle
import py_compile
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
USER = "spegel-tx"
UID = 10001
PASSWD_LINE = f"{USER}:x:{UID}:{UID}:spegel-tx:/nonexistent:/usr/sbin/nologin\n"
GROUP_LINE = f"{USER}:x:{UID}:\n"
ROOT_PASSWD_LINE = "root:x:0:0:root:/root:/usr/sbin/nologin\n"
ROOT_GROUP_LINE = "root:x:0:\n"
TEST_SUITES = ("test", "tests", "_test")
PLUGIN_CHECK = (
    "from twisted.application.service import IServiceMaker\n"
    "from twisted.plugin import getPlugins\n"
    "names = {p.tapname for p in getPlugins(IServiceMaker)}\n"
    "assert 'spegel' in names, names\n"
)


def site_packages() -> Path:
    """Where pip puts packages for this python as root: Debian's /usr/local scheme."""
    return Path(sysconfig.get_path("purelib"))


def source_date_epoch() -> int:
    """The build's time (SOURCE_DATE_EPOCH, as reproducible builds set it), else now."""
    return int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())


def compile_tree(path: Path, force: bool = False) -> None:
    """Byte-code Python trusts without looking at the source: fixed for the image's life.
    ``force`` replaces byte-code that Debian's packages compiled against source times."""
    options = {
        "quiet": 1,
        "force": force,
        "invalidation_mode": py_compile.PycInvalidationMode.UNCHECKED_HASH,
    }
    if path.is_dir():
        ok = compileall.compile_dir(path, workers=0, **options)
    else:
        ok = compileall.compile_file(path, **options)
    if not ok:
        raise SystemExit(f"install.py: byte-compiling {path} failed")


def add_line(path: Path, name: str, line: str) -> None:
    existing = path.read_text() if path.exists() else ""
    if not any(entry.split(":", 1)[0] == name for entry in existing.splitlines()):
        path.write_text(existing + line)


def system() -> None:
    """The unprivileged user the image runs as by default, and the stdlib's byte-code."""
    etc = Path("/etc")
    add_line(etc / "passwd", "root", ROOT_PASSWD_LINE)
    add_line(etc / "group", "root", ROOT_GROUP_LINE)
    add_line(etc / "passwd", USER, PASSWD_LINE)
    add_line(etc / "group", USER, GROUP_LINE)
    compile_tree(Path(sysconfig.get_path("stdlib")), force=True)


def pip(*args: str) -> None:
    (wheel,) = HERE.glob("pip-*.whl")
    command = [sys.executable, str(wheel / "pip"), *args]
    environment = os.environ | {
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
        # No pip, apt or dpkg in the image will ever manage these files but this one.
        "PIP_BREAK_SYSTEM_PACKAGES": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    subprocess.run(command, check=True, env=environment)


def remove_test_suites(site: Path) -> None:
    """The libraries' own test packages, a quarter of the installed size (Twisted's
    alone is 15 MB): the daemon never imports them."""
    suites = {path.parent for path in site.rglob("__init__.py") if path.parent.name in TEST_SUITES}
    for suite in sorted(suites):
        if suite.exists():
            shutil.rmtree(suite)


def dependencies() -> None:
    pip(
        "install",
        "--no-compile",
        "--no-deps",
        "--no-index",
        f"--find-links={HERE}",
        "--only-binary=:all:",
        "--require-hashes",
        "--requirement",
        str(HERE / "requirements.txt"),
    )
    remove_test_suites(site_packages())
    compile_tree(site_packages())


def package() -> None:
    (wheel,) = HERE.glob("spegel_tx-*.whl")
    pip("install", "--no-compile", "--no-deps", "--no-index", str(wheel))
    # Every requirement of spegel-tx is met by the pinned dependencies.
    pip("check")
    site = site_packages()
    compile_tree(site / "spegel_tx")
    compile_tree(site / "twisted" / "plugins" / "spegel_plugin.py")
    write_plugin_cache(site / "twisted" / "plugins")


def write_plugin_cache(plugins: Path) -> None:
    """Twisted rescans when a plugin module is as new as dropin.cache, so the modules get
    the build's time less a second and the cache the build's time: a build that clamps
    times to SOURCE_DATE_EPOCH keeps that order."""
    epoch = source_date_epoch()
    for module in plugins.glob("*.py"):
        os.utime(module, (epoch - 1, epoch - 1))
    discover = [sys.executable, "-c", PLUGIN_CHECK]
    environment = os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run(discover, check=True, env=environment)
    cache = plugins / "dropin.cache"
    # Modules in name order, not the order the file system listed them in.
    entries = pickle.loads(cache.read_bytes())
    cache.write_bytes(pickle.dumps(dict(sorted(entries.items()))))
    os.utime(cache, (epoch, epoch))
    # A second discovery must find the cache current and leave it alone.
    before = cache.read_bytes()
    subprocess.run(discover, check=True, env=environment)
    if cache.stat().st_mtime != epoch or cache.read_bytes() != before:
        raise SystemExit(f"install.py: Twisted rewrote {cache}; the plugin cache is not current")


STAGES = {"system": system, "dependencies": dependencies, "package": package}


def main(arguments: list[str]) -> None:
    if not arguments or any(stage not in STAGES for stage in arguments):
        raise SystemExit(f"usage: python3 install.py {{{','.join(STAGES)}}}...")
    for stage in arguments:
        STAGES[stage]()


if __name__ == "__main__":
    main(sys.argv[1:])
