"""Blob serving speed: spegel-tx against nginx (sendfile) on the same file, in one run.

A 1 GiB random blob is ingested into a private containerd; spegel-tx serves it
from containerd's content directory and nginx serves the same bytes from a plain
file. Rounds alternate between the two; curl downloads to /dev/null with 1 and
4 concurrent clients. Prints MB/s medians, the ratio to nginx, and spegel-tx's
peak RSS. Everything runs on 127.0.0.1 and stops by PID at the end.

    python3 bench/serve.py [--size-mib 1024] [--rounds 5]

Needs Debian's containerd, nginx (nginx-light) and curl.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.containerd import Containerd  # noqa: E402
from tests.support.processes import (  # noqa: E402
    free_port,
    start_process,
    start_spegel,
    stop_process,
    wait_for_http,
)

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def write_random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as f:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 16 << 20))
            digest.update(chunk)
            f.write(chunk)
            remaining -= len(chunk)
    return "sha256:" + digest.hexdigest()


def download(url: str, clients: int, size: int, timeout: float) -> float:
    """Aggregate MB/s of ``clients`` concurrent curls fetching ``url`` to /dev/null."""
    started = time.monotonic()
    curls = [
        subprocess.Popen(
            [
                "curl",
                "-sf",
                "-o",
                "/dev/null",
                "--max-time",
                str(timeout),
                "-w",
                "%{size_download}",
                url,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(clients)
    ]
    sizes = [int(curl.communicate()[0] or 0) for curl in curls]
    elapsed = time.monotonic() - started
    if any(curl.returncode for curl in curls) or any(s != size for s in sizes):
        raise SystemExit(f"download of {url} failed: sizes {sizes}")
    return clients * size / elapsed / 1e6


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for tool in ("containerd", "ctr", "nginx", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} is not installed (apt-get install containerd nginx-light curl)"
            )
    size = args.size_mib << 20
    timeout = 120.0
    work = Path(tempfile.mkdtemp(prefix="spegel-bench-"))
    work.chmod(0o755)  # nginx's workers run as nobody
    processes = []
    containerd = None
    try:
        blob = work / "www" / "blob"
        blob.parent.mkdir()
        print(f"writing {args.size_mib} MiB of random data ...", flush=True)
        digest = write_random_file(blob, size)

        containerd = Containerd(work / "containerd")
        containerd.start()
        with blob.open("rb") as f:
            containerd.ctr(
                "content",
                "ingest",
                "--expected-size",
                str(size),
                "--expected-digest",
                digest,
                "bench-blob",
                stdin=f,
            )

        nginx_port = free_port("127.0.0.1")
        (work / "nginx" / "tmp").mkdir(parents=True)
        conf = work / "nginx" / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=work / "nginx", port=nginx_port, root=blob.parent))
        nginx = start_process(
            ["nginx", "-c", str(conf), "-p", str(work / "nginx")], work / "nginx.log"
        )
        processes.append(nginx)
        nginx_url = f"http://127.0.0.1:{nginx_port}/blob"
        wait_for_http(nginx_url, nginx, work / "nginx.log", timeout=20)

        spegel_port = free_port("127.0.0.1")
        keys = {
            "registry-addr": f"127.0.0.1:{spegel_port}",
            "containerd-sock": containerd.address,
            "containerd-namespace": containerd.namespace,
            "containerd-content-path": containerd.content_path,
        }
        spegel, _ = start_spegel(keys, work)
        processes.append(spegel)
        spegel_url = f"http://127.0.0.1:{spegel_port}/v2/bench/blobs/{digest}"
        wait_for_http(
            f"http://127.0.0.1:{spegel_port}/readyz", spegel, work / "spegel.log", timeout=30
        )

        results: dict[tuple[str, int], list[float]] = {}
        for url in (nginx_url, spegel_url):  # warm the page cache for both files
            download(url, 1, size, timeout)
        for round_number in range(args.rounds):
            for clients in (1, 4):
                for name, url in (("nginx", nginx_url), ("spegel-tx", spegel_url)):
                    speed = download(url, clients, size, timeout)
                    results.setdefault((name, clients), []).append(speed)
            print(f"round {round_number + 1}/{args.rounds} done", flush=True)

        rss = peak_rss_mib(spegel.pid)
        print()
        print(f"blob {args.size_mib} MiB, {args.rounds} rounds, medians (MB/s):")
        print(f"{'clients':>8} {'nginx':>10} {'spegel-tx':>10} {'ratio':>7}")
        for clients in (1, 4):
            reference = statistics.median(results[("nginx", clients)])
            ours = statistics.median(results[("spegel-tx", clients)])
            print(f"{clients:>8} {reference:>10.0f} {ours:>10.0f} {ours / reference:>7.2f}")
        print(f"spegel-tx peak RSS: {rss:.0f} MiB")
    finally:
        for process in reversed(processes):
            stop_process(process)
        if containerd is not None:
            containerd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
