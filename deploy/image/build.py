"""Build the spegel-tx image without Docker, as an OCI archive: dist/spegel-tx-<version>.tar.

Run through deploy/image/build.sh, which checks the machine first (Debian, root, the
tools). Nothing comes from a container registry: the root file system is unpacked
from Debian's packages, the Python packages come from PyPI, pinned with hashes.

Three layers, built in a chroot by the image's own python3 (deploy/image/install.py,
the same steps as deploy/Dockerfile):

1. Debian bookworm's python3 and the libraries it needs, unpacked by mmdebstrap. No
   dpkg, apt, shell or coreutils: nothing in the image installs or runs anything but
   the daemon's commands. Docs go, except each package's copyright file;
   /var/lib/dpkg/status still lists the packages, for vulnerability scanners.
   The user spegel-tx (10001) and the stdlib's byte-code are added.
2. The dependencies pinned in requirements.txt.
3. spegel-tx's wheel, its byte-code and Twisted's plugin cache.

Each layer is a tar of sorted names, numeric owners and times clamped to
SOURCE_DATE_EPOCH (default: the time of the last commit); umoci stacks them with the
configuration of deploy/Dockerfile's last stage (entrypoint, user, environment,
ports, labels), so the two builds cannot drift apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SOURCES = ("LICENSE", "README.md", "pyproject.toml", "setup.cfg", "spegel_tx", "twisted")
"""What the wheel is built from (as .dockerignore lets into Docker's context)."""

SUITE = "bookworm"
"""Debian release; its python3 (3.11) is the one requirements.txt is locked for."""
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
"""Overridden by DEBIAN_MIRROR and DEBIAN_SECURITY_MIRROR, e.g. snapshot.debian.org's
archive at a fixed time, to rebuild the same Debian layer later."""
PACKAGES = ("python3", "libstdc++6", "base-files")
"""What the image runs on: Debian's python3, the C++ runtime grpcio's extension needs,
and base-files (os-release, which scanners read, and the common licences)."""
UNNEEDED = (
    # Pulled in by python3-minimal and base-files to install packages, never to run.
    "dpkg",
    "tar",
    "mawk",
    "libacl1",
    "libmd0",
    "libselinux1",
    "libpcre2-8-0",
    "libzstd1",
    # Only for stdlib modules the daemon never imports: sqlite3, dbm, curses,
    # readline, nis. Their extension modules go too (UNUSED_MODULES).
    "libsqlite3-0",
    "libdb5.3",
    "libncursesw6",
    "libtinfo6",
    "libreadline8",
    "readline-common",
    "libnsl2",
    "libtirpc3",
    "libtirpc-common",
    "libgssapi-krb5-2",
    "libkrb5-3",
    "libk5crypto3",
    "libkrb5support0",
    "libcom-err2",
    "libkeyutils1",
)
UNUSED_MODULES = re.compile(
    r"(_sqlite3|_dbm|_curses|_curses_panel|readline|nis|_test\w*|_ctypes_test|_xxtestfuzz"
    r"|xxlimited\w*)\.cpython-.*\.so"
)
UNSHIPPED = (
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/doc-base",
    "usr/share/bug",
    "usr/share/menu",
    "usr/share/applications",
    "usr/share/pixmaps",
    "usr/share/binfmts",
    "usr/lib/binfmt.d",
    "usr/lib/valgrind",
    # glibc's iconv character sets: Python has its own codecs.
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/aarch64-linux-gnu/gconv",
    # Written by mmdebstrap for its own run.
    "etc/apt",
    "etc/resolv.conf",
    "etc/hostname",
    "etc/fstab",
    "var/cache/apt",
    "var/lib/apt",
    "var/log/apt",
)
MOUNT_POINTS = ("proc", "sys", "dev", "run", "tmp")
"""Empty directories the runtime mounts over (tmp for the odd library that wants one)."""
ARCHITECTURES = {"amd64": "x86_64", "arm64": "aarch64"}
LOADERS = {"amd64": "/lib64/ld-linux-x86-64.so.2", "arm64": "/lib/ld-linux-aarch64.so.1"}
CHROOT_PATH = "/usr/local/bin:/usr/bin:/bin"
STAGES = ("system", "dependencies", "package")
"""install.py's steps; the last two each make a layer (the first completes the base)."""


def platforms(machine: str) -> list[str]:
    """The wheel platform tags glibc 2.36 (bookworm) runs, as pip's --platform takes them."""
    return [f"manylinux_2_{minor}_{machine}" for minor in range(36, 16, -1)] + [
        f"manylinux2014_{machine}"
    ]


def run(*command: str | Path, **options: Any) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(str(part) for part in command), file=sys.stderr, flush=True)
    return subprocess.run([str(part) for part in command], check=True, text=True, **options)


def output(*command: str | Path, cwd: Path = ROOT) -> str:
    return subprocess.run(
        [str(part) for part in command], check=True, text=True, capture_output=True, cwd=cwd
    ).stdout.strip()


# What the build is: version, commit, time


@dataclass(frozen=True)
class Build:
    version: str
    revision: str
    source_url: str
    epoch: int
    architecture: str
    name: str

    @property
    def machine(self) -> str:
        return ARCHITECTURES[self.architecture]

    @property
    def created(self) -> str:
        moment = datetime.datetime.fromtimestamp(self.epoch, datetime.UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    @property
    def reference(self) -> str:
        return f"{normalized_name(self.name)}:{self.version}"

    @property
    def build_args(self) -> dict[str, str]:
        return {"VERSION": self.version, "REVISION": self.revision, "SOURCE_URL": self.source_url}


def package_version(root: Path = ROOT) -> str:
    text = (root / "spegel_tx" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    if match is None:
        raise SystemExit("build: no __version__ in spegel_tx/__init__.py")
    return match.group(1)


def normalized_name(name: str) -> str:
    """The image name as containerd and the kubelet complete it (``spegel-tx`` is
    ``docker.io/library/spegel-tx``)."""
    first, _, rest = name.partition("/")
    if not rest:
        return f"docker.io/library/{name}"
    if "." not in first and ":" not in first and first != "localhost":
        return f"docker.io/{name}"
    return name


def git_revision() -> str:
    """The commit, marked -dirty when what the image is built from differs from it."""
    revision = output("git", "rev-parse", "HEAD")
    changed = subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", *SOURCES, "deploy"], cwd=ROOT
    ).returncode
    return f"{revision}-dirty" if changed else revision


def source_url(environ: Mapping[str, str]) -> str:
    if environ.get("SOURCE_URL"):
        return environ["SOURCE_URL"]
    remote = subprocess.run(
        ["git", "remote", "get-url", "origin"], cwd=ROOT, capture_output=True, text=True
    )
    return remote.stdout.strip() if remote.returncode == 0 else "unknown"


def describe_build(environ: Mapping[str, str]) -> Build:
    epoch = environ.get("SOURCE_DATE_EPOCH") or output("git", "log", "-1", "--format=%ct")
    return Build(
        version=package_version(),
        revision=git_revision(),
        source_url=source_url(environ),
        epoch=int(epoch),
        architecture=output("dpkg", "--print-architecture"),
        name=environ.get("IMAGE_NAME") or "spegel-tx",
    )


# The image's configuration, from deploy/Dockerfile


def image_config(dockerfile: Path, build_args: Mapping[str, str]) -> dict[str, Any]:
    """The OCI config fields deploy/Dockerfile's last stage sets, ARGs filled in."""
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(
        str(dockerfile), env_replace=True, build_args=dict(build_args), cache_content=True
    )
    config: dict[str, Any] = {
        "Env": [f"{key}={value}" for key, value in parser.envs.items()],
        "Labels": dict(parser.labels),
        "ExposedPorts": {},
    }
    for instruction in parser.structure:
        kind, value = instruction["instruction"], instruction["value"]
        if kind == "FROM":
            config = {"Env": config["Env"], "Labels": config["Labels"], "ExposedPorts": {}}
        elif kind in ("ENTRYPOINT", "CMD"):
            config[kind.capitalize()] = json.loads(value)
        elif kind == "USER":
            config["User"] = value
        elif kind == "WORKDIR":
            config["WorkingDir"] = value
        elif kind == "EXPOSE":
            config["ExposedPorts"].update({port: {} for port in value.split()})
    return config


def umoci_config_options(config: Mapping[str, Any]) -> list[str]:
    options = [f"--config.user={config['User']}", f"--config.workingdir={config['WorkingDir']}"]
    options += [f"--config.entrypoint={part}" for part in config["Entrypoint"]]
    options += [f"--config.cmd={part}" for part in config.get("Cmd", [])]
    options += [f"--config.env={entry}" for entry in config["Env"]]
    options += [f"--config.exposedports={port}" for port in config["ExposedPorts"]]
    options += [f"--config.label={key}={value}" for key, value in config["Labels"].items()]
    return options


# Inputs: tools, wheels


def download(requirements: Path, machine: str, destination: Path) -> None:
    run(
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        *(f"--platform={platform}" for platform in platforms(machine)),
        "--python-version=3.11",
        "--implementation=cp",
        "--abi=cp311",
        f"--requirement={requirements}",
        f"--dest={destination}",
    )


def build_wheel(work: Path, pip_wheel: Path, destination: Path, epoch: int) -> None:
    """From a copy of the sources, so a stale build/ in the tree cannot leak in; the
    zip's times are SOURCE_DATE_EPOCH's, so the wheel's hash (which pip records in the
    image) is the same from build to build."""
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "dropin.cache")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    run(
        sys.executable,
        pip_wheel / "pip",
        "wheel",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        f"--wheel-dir={destination}",
        source,
        env=os.environ | {"SOURCE_DATE_EPOCH": str(epoch)},
    )


# The Debian root file system


def make_root(work: Path, build: Build) -> tuple[Path, Path]:
    """Debian's packages unpacked into a directory; returns it and the .deb files used."""
    root = work / "root"
    mirror = os.environ.get("DEBIAN_MIRROR") or MIRROR
    security = os.environ.get("DEBIAN_SECURITY_MIRROR") or SECURITY_MIRROR
    sources = [
        f"deb {mirror} {SUITE} main",
        f"deb {mirror} {SUITE}-updates main",
        f"deb {security} {SUITE}-security main",
    ]
    run(
        "mmdebstrap",
        "--quiet",
        "--mode=root",
        "--variant=extract",
        "--format=directory",
        f"--architectures={build.architecture}",
        f"--include={','.join(PACKAGES)}",
        "--skip=cleanup/apt/cache",
        SUITE,
        root,
        *sources,
        env=os.environ | {"SOURCE_DATE_EPOCH": str(build.epoch)},
    )
    debs = work / "debs"
    shutil.move(root / "var" / "cache" / "apt" / "archives", debs)
    return root, debs


def deb_paths(deb: Path) -> list[str]:
    """The paths a package holds, relative to the root (``usr/bin/dpkg``)."""
    contents = output("dpkg-deb", "--contents", deb)
    # drwxr-xr-x root/root 0 2023-01-03 12:00 ./usr/bin/  (a link adds " -> target")
    paths = [line.split(None, 5)[5].split(" -> ")[0] for line in contents.splitlines()]
    return [path.removeprefix("./").rstrip("/") for path in paths if path != "./"]


def deb_name(deb: Path) -> str:
    return output("dpkg-deb", "--field", deb, "Package")


def dpkg_status(controls: Iterable[str]) -> str:
    """/var/lib/dpkg/status for packages given by their control files, as dpkg writes it."""
    entries = []
    for control in sorted(controls, key=lambda text: text.split("\n", 1)[0]):
        first, _, rest = control.strip("\n").partition("\n")
        entries.append(f"{first}\nStatus: install ok installed\n{rest}\n")
    return "\n".join(entries)


def remove(root: Path, relative: str) -> None:
    path = root / relative
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def trim_root(root: Path, debs: Path) -> list[str]:
    """Drop UNNEEDED packages, docs and build leftovers; returns the kept packages."""
    kept, controls, dropped_dirs = [], [], set()
    for deb in sorted(debs.glob("*.deb")):
        name = deb_name(deb)
        if name in UNNEEDED:
            for relative in deb_paths(deb):
                if (root / relative).is_dir() and not (root / relative).is_symlink():
                    dropped_dirs.add(relative)
                else:
                    remove(root, relative)
        else:
            kept.append(name)
            controls.append(output("dpkg-deb", "--field", deb))
    missing = set(UNNEEDED) - {deb_name(deb) for deb in debs.glob("*.deb")}
    if missing:
        print(f"build: not pulled in any more: {', '.join(sorted(missing))}", file=sys.stderr)
    for directory in sorted(dropped_dirs, key=len, reverse=True):
        path = root / directory
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    for relative in UNSHIPPED:
        remove(root, relative)
    for module in (root / "usr" / "lib").glob("python3*/lib-dynload/*.so"):
        if UNUSED_MODULES.fullmatch(module.name):
            module.unlink()
    docs = root / "usr" / "share" / "doc"
    for path in sorted(docs.rglob("*"), reverse=True):
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        elif path.name != "copyright":
            path.unlink()
    dpkg = root / "var" / "lib" / "dpkg"
    shutil.rmtree(dpkg, ignore_errors=True)
    dpkg.mkdir(parents=True)
    (dpkg / "status").write_text(dpkg_status(controls))
    for directory in MOUNT_POINTS:
        (root / directory).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    return kept


def check_libraries(root: Path, architecture: str) -> None:
    """Every ELF file finds each library it needs inside the image."""
    loader = LOADERS[architecture]
    broken = []
    for path in sorted(walk(root)):
        file = root / path
        if file.is_symlink() or not file.is_file() or path.startswith("dev/"):
            continue
        with file.open("rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
        listing = subprocess.run(
            ["chroot", str(root), loader, "--list", f"/{path}"], capture_output=True, text=True
        )
        if "not found" in listing.stdout:
            missing = [line.strip() for line in listing.stdout.splitlines() if "not found" in line]
            broken.append(f"/{path}: {', '.join(missing)}")
    if broken:
        raise SystemExit("build: libraries missing from the image:\n" + "\n".join(broken))


def install(root: Path, staging: Path, stage: str, build: Build) -> None:
    """``python3 install.py <stage>`` in the root, with the staged files at /tmp/image."""
    inside = root / "tmp" / "image"
    shutil.copytree(staging, inside)
    try:
        run(
            shutil.which("chroot") or "chroot",
            root,
            "/usr/bin/python3",
            "/tmp/image/install.py",
            stage,
            env={
                "PATH": CHROOT_PATH,
                "LC_ALL": "C.UTF-8",
                "HOME": "/root",
                "SOURCE_DATE_EPOCH": str(build.epoch),
            },
        )
    finally:
        shutil.rmtree(inside)


# Layers


def walk(root: Path) -> Iterator[str]:
    """Every path under root, relative, without following symlinks."""
    for directory, dirnames, filenames in os.walk(root):
        base = Path(directory).relative_to(root)
        for name in dirnames + filenames:
            yield str(base / name) if str(base) != "." else name


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """What a layer diff compares: type, mode, owner, size, time and link target."""
    entries = {}
    for path in walk(root):
        info = os.lstat(root / path)
        link = os.readlink(root / path) if (root / path).is_symlink() else ""
        entries[path] = (
            info.st_mode,
            info.st_uid,
            info.st_gid,
            info.st_size,
            info.st_mtime_ns,
            link,
        )
    return entries


def changes(
    before: Mapping[str, tuple[Any, ...]], after: Mapping[str, tuple[Any, ...]]
) -> list[str]:
    """Paths a layer on top of ``before`` must hold to give ``after``: new entries, and
    changed ones (a directory only when its mode or owner changed, not its time)."""
    removed = sorted(set(before) - set(after))
    if removed:
        raise SystemExit(f"build: a layer would need whiteouts for {removed[:5]}")
    changed = []
    for path, entry in after.items():
        old = before.get(path)
        if old is None:
            changed.append(path)
        elif stat.S_ISDIR(entry[0]):
            if old[:3] != entry[:3]:
                changed.append(path)
        elif old != entry:
            changed.append(path)
    return sorted(changed)


def tar_layer(root: Path, paths: Sequence[str], destination: Path, epoch: int) -> Path:
    """An uncompressed layer: names in sorted order, numeric owners, no atime or ctime,
    and every time later than the build's clamped to it."""
    listing = destination.with_suffix(".list")
    listing.write_bytes(b"".join(path.encode() + b"\0" for path in paths))
    run(
        "tar",
        "--create",
        f"--file={destination}",
        f"--directory={root}",
        "--no-recursion",
        "--null",
        f"--files-from={listing}",
        "--format=posix",
        "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
        f"--mtime=@{epoch}",
        "--clamp-mtime",
        "--numeric-owner",
    )
    listing.unlink()
    return destination


# The OCI image


def assemble(
    work: Path, layers: Sequence[tuple[Path, str]], config: Mapping[str, Any], build: Build
) -> Path:
    """An OCI layout holding the image, tagged with its version."""
    layout = work / "oci"
    image = f"{layout}:{build.version}"
    run("umoci", "init", f"--layout={layout}")
    run("umoci", "new", f"--image={image}")
    for tar, created_by in layers:
        run(
            "umoci",
            "raw",
            "add-layer",
            f"--image={image}",
            f"--history.created={build.created}",
            f"--history.created_by={created_by}",
            tar,
        )
    run(
        "umoci",
        "config",
        f"--image={image}",
        f"--created={build.created}",
        f"--architecture={build.architecture}",
        "--os=linux",
        "--no-history",
        *umoci_config_options(config),
    )
    run("umoci", "gc", f"--layout={layout}")
    name_image(layout, build)
    return layout


def name_image(layout: Path, build: Build) -> None:
    """The name ``ctr images import`` gives the image (its own annotation), beside the
    tag that skopeo's ``oci-archive:FILE:TAG`` looks up."""
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    (manifest,) = index["manifests"]
    manifest["annotations"] = {
        "io.containerd.image.name": build.reference,
        "org.opencontainers.image.ref.name": build.version,
    }
    index_path.write_text(json.dumps(index, sort_keys=True, separators=(",", ":")))


def write_archive(layout: Path, destination: Path, epoch: int) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    run(
        "tar",
        "--create",
        f"--file={destination}",
        f"--directory={layout}",
        "--sort=name",
        "--format=posix",
        "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
        f"--mtime=@{epoch}",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        ".",
    )


# The build


def stage_inputs(work: Path, build: Build) -> tuple[Path, dict[str, Any]]:
    """Everything install.py reads, in one directory (pip's wheel, the pinned wheels,
    spegel-tx's wheel), and the image configuration from the Dockerfile."""
    staging, tools = work / "staging", work / "tools"
    staging.mkdir()
    download(HERE / "build-requirements.txt", build.machine, tools)
    (pip_wheel,) = tools.glob("pip-*.whl")
    (parser_wheel,) = tools.glob("dockerfile_parse-*.whl")
    sys.path.insert(0, str(parser_wheel))
    config = image_config(DOCKERFILE, build.build_args)
    shutil.copy2(pip_wheel, staging)
    download(HERE / "requirements.txt", build.machine, staging)
    build_wheel(work, pip_wheel, staging, build.epoch)
    for name in ("install.py", "requirements.txt"):
        shutil.copy2(HERE / name, staging)
    return staging, config


def build_layers(work: Path, staging: Path, build: Build) -> list[tuple[Path, str]]:
    """The three layer tars and what made each."""
    root, debs = make_root(work, build)
    kept = trim_root(root, debs)
    install(root, staging, STAGES[0], build)
    layers_dir = work / "layers"
    layers_dir.mkdir()
    before = snapshot(root)
    base = sorted(path for path in before if not path.startswith("dev/"))
    made_by = f"deploy/image/build.py: Debian {SUITE}: {', '.join(kept)}; install.py system"
    layers = [(tar_layer(root, base, layers_dir / "base.tar", build.epoch), made_by)]
    for stage in STAGES[1:]:
        install(root, staging, stage, build)
        after = snapshot(root)
        tar = tar_layer(root, changes(before, after), layers_dir / f"{stage}.tar", build.epoch)
        layers.append((tar, f"deploy/image/build.py: install.py {stage}"))
        before = after
    check_libraries(root, build.architecture)
    return layers


def report_sizes(layout: Path, layers: Sequence[tuple[Path, str]]) -> None:
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    compressed = [layer["size"] for layer in json.loads(manifest_path.read_text())["layers"]]
    for (tar, _), size in zip(layers, compressed, strict=True):
        print(
            f"layer {tar.stem}: {size / 2**20:.1f} MiB compressed, "
            f"{tar.stat().st_size / 2**20:.1f} MiB unpacked"
        )
    unpacked = sum(tar.stat().st_size for tar, _ in layers)
    print(
        f"image: {sum(compressed) / 2**20:.1f} MiB compressed, {unpacked / 2**20:.1f} MiB unpacked"
    )


def build_image(build: Build, output_dir: Path, keep: Path | None) -> Path:
    work = Path(tempfile.mkdtemp(prefix="spegel-tx-image."))
    try:
        staging, config = stage_inputs(work, build)
        layers = build_layers(work, staging, build)
        layout = assemble(work, layers, config, build)
        archive = output_dir / f"spegel-tx-{build.version}.tar"
        write_archive(layout, archive, build.epoch)
        report_sizes(layout, layers)
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(layout, keep)
        return archive
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(arguments: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "dist", help="default dist/")
    parser.add_argument(
        "--keep-layout", type=Path, metavar="DIR", help="also leave the OCI layout in DIR"
    )
    options = parser.parse_args(arguments)
    build = describe_build(os.environ)
    archive = build_image(build, options.output, options.keep_layout)
    print(f"{archive}: {build.reference} ({build.revision}, built at {build.created})")


if __name__ == "__main__":
    main()
