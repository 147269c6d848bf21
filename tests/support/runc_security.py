"""A runc in front of runc: applies a Kubernetes securityContext to the container's spec.

``ctr run`` cannot set a container's user, and what it can set (capabilities, no new
privileges) it sets differently from the kubelet. The tests run containers with
``--runc-binary`` pointing here and the rendered securityContext in the annotation
``ANNOTATION``; on ``runc create`` this rewrites the bundle's config.json the way
containerd's CRI plugin translates a securityContext, then runs the real runc.

    ANNOTATION = {"securityContext": {...}, "podSecurityContext": {...}}
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

ANNOTATION = "spegel-tx.test/security-context"
CAPABILITY_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")


def primary_group(rootfs: Path, uid: int) -> int:
    """The user's group from the image's /etc/passwd, as CRI resolves a bare runAsUser."""
    try:
        lines = (rootfs / "etc" / "passwd").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in lines:
        fields = line.split(":")
        if len(fields) > 3 and fields[2] == str(uid):
            return int(fields[3])
    return 0


def apply(spec: dict[str, Any], context: dict[str, Any], pod: dict[str, Any]) -> None:
    process = spec["process"]
    uid = context.get("runAsUser", pod.get("runAsUser"))
    if uid is not None:
        rootfs = Path(spec["root"]["path"])
        gid = context.get("runAsGroup", pod.get("runAsGroup"))
        process["user"] = {
            "uid": uid,
            "gid": gid if gid is not None else primary_group(rootfs, uid),
            "additionalGids": list(pod.get("supplementalGroups", [])),
        }
    capabilities = context.get("capabilities") or {}
    dropped = {f"CAP_{name}" for name in capabilities.get("drop", [])}
    added = [f"CAP_{name}" for name in capabilities.get("add", [])]
    sets = process.setdefault("capabilities", {})
    for name in CAPABILITY_SETS:
        kept = [] if "CAP_ALL" in dropped else [c for c in sets.get(name, []) if c not in dropped]
        if name != "ambient":
            kept += [c for c in added if c not in kept]
        sets[name] = kept
    if "allowPrivilegeEscalation" in context:
        process["noNewPrivileges"] = not context["allowPrivilegeEscalation"]
    if "readOnlyRootFilesystem" in context:
        spec["root"]["readonly"] = bool(context["readOnlyRootFilesystem"])


def bundle_of(arguments: list[str]) -> Path | None:
    if "create" not in arguments:
        return None
    for index, argument in enumerate(arguments):
        if argument in ("--bundle", "-b") and index + 1 < len(arguments):
            return Path(arguments[index + 1])
        if argument.startswith("--bundle="):
            return Path(argument.split("=", 1)[1])
    return Path.cwd()


def main() -> None:
    arguments = sys.argv[1:]
    bundle = bundle_of(arguments)
    if bundle is not None:
        config = bundle / "config.json"
        spec = json.loads(config.read_text())
        wanted = (spec.get("annotations") or {}).get(ANNOTATION)
        if wanted:
            contexts = json.loads(wanted)
            apply(spec, contexts.get("securityContext", {}), contexts.get("podSecurityContext", {}))
            config.write_text(json.dumps(spec))
    runc = os.environ.get("REAL_RUNC") or shutil.which("runc") or "/usr/sbin/runc"
    os.execv(runc, [runc, *arguments])


if __name__ == "__main__":
    main()
