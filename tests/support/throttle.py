"""A TCP proxy that limits what a server sends, all connections together, and counts it.

    python3 -m tests.support.throttle LISTEN_HOST:PORT TARGET_HOST:PORT BYTES_PER_SECOND STATS

It stands in front of the test upstream as a slow registry link: every byte the
server sends to any client shares one token bucket, so N nodes pulling at once
share the rate as they would share an uplink. ``STATS`` gets the total bytes
sent to clients, rewritten every 50 ms and at exit. Loopback only; runs until
SIGTERM. ``Throttle`` starts and stops it as a process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.processes import free_port, start_process, stop_process

CHUNK = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]


class Bucket:
    """Tokens refill at ``rate`` a second, up to a tenth of a second's worth."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._burst = max(rate / 10, CHUNK)
        self._tokens = self._burst
        self._at = time.monotonic()
        self._lock = asyncio.Lock()
        self.sent = 0

    async def take(self, n: int) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
                self._at = now
                if self._tokens >= n:
                    self._tokens -= n
                    self.sent += n
                    return
                await asyncio.sleep((n - self._tokens) / self._rate)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: Bucket | None
) -> None:
    try:
        while data := await reader.read(CHUNK):
            if bucket is not None:
                await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def _serve(listen: str, target: str, rate: float, stats: Path) -> None:
    bucket = Bucket(rate)
    target_host, _, target_port = target.rpartition(":")

    async def relay(
        client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(
                target_host, int(target_port)
            )
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            _pipe(client_reader, server_writer, None),
            _pipe(server_reader, client_writer, bucket),
        )

    host, _, port = listen.rpartition(":")
    server = await asyncio.start_server(relay, host, int(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def report() -> None:
        while True:
            _write_stats(stats, bucket.sent)
            await asyncio.sleep(0.05)

    reporter = asyncio.ensure_future(report())
    async with server:
        await stop.wait()
    reporter.cancel()
    _write_stats(stats, bucket.sent)


def _write_stats(stats: Path, sent: int) -> None:
    partial = stats.with_suffix(".tmp")
    partial.write_text(str(sent))
    os.replace(partial, stats)


class Throttle:
    """The proxy as a process: ``address`` stands for ``target`` at ``rate`` bytes a second."""

    def __init__(self, base: Path, host: str, target: str, rate: float) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = free_port(host)
        self.address = f"{host}:{self.port}"
        self.target = target
        self.rate = rate
        self.stats = base / "sent"
        self.log_path = base / "throttle.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = start_process(
            [
                sys.executable,
                "-m",
                "tests.support.throttle",
                self.address,
                self.target,
                str(self.rate),
                str(self.stats),
            ],
            self.log_path,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 10
        while not self.stats.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the throttle did not start: {self.log_path.read_text()}")
            time.sleep(0.02)

    def sent(self) -> int:
        """Bytes sent to clients so far."""
        return int(self.stats.read_text() or 0)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
        self.process = None


if __name__ == "__main__":
    listen_address, target_address, bytes_per_second, stats_path = sys.argv[1:5]
    asyncio.run(_serve(listen_address, target_address, float(bytes_per_second), Path(stats_path)))
