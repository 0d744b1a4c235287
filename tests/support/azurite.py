"""Azurite, Microsoft's Azure Storage emulator, as a throwaway blob service for tests.

``scripts/install-azurite.sh`` installs it from npm into ``.cache/azurite``.
The blob service listens on 127.0.0.1 at a port the OS picks (``--blobPort 0``;
the port is read from its start-up line), keeps everything in memory (its
working directory is a temp dir), and is stopped on exit. A small watchdog
process stops it too if the test process dies without cleaning up (SIGKILL),
so an aborted run leaks no server.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCAL_BIN = REPO / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
# The emulator's well-known development account (published in Microsoft's docs; not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTENING = re.compile(r"successfully listens on http://127\.0\.0\.1:(\d+)")

# Waits for the test process's end of a pipe to close, then stops Azurite.
_WATCHDOG = """
import os, signal, sys
sys.stdin.buffer.read()
try:
    os.kill(int(sys.argv[1]), signal.SIGTERM)
except ProcessLookupError:
    pass
"""


def find_azurite() -> Path | None:
    """The ``azurite-blob`` executable: ``$AZURITE_BLOB_BIN``, the project's .cache, or on PATH."""
    for candidate in (os.environ.get("AZURITE_BLOB_BIN"), LOCAL_BIN, shutil.which("azurite-blob")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def connection_string(port: int, account_key: str = ACCOUNT_KEY) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={account_key};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")


class Azurite:
    """``with Azurite() as azurite:`` a running blob service; ``azurite.connection_string`` reaches it."""

    def __init__(self, binary: Path | None = None, start_timeout: float = 60.0):
        self.binary = binary or find_azurite()
        if self.binary is None:
            raise FileNotFoundError("azurite-blob not found: run scripts/install-azurite.sh")
        self.start_timeout = start_timeout
        self.port: int | None = None
        self._process: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        self._workspace: tempfile.TemporaryDirectory | None = None
        self._output: list[str] = []

    @property
    def connection_string(self) -> str:
        return connection_string(self.port)

    @property
    def blob_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def __enter__(self) -> "Azurite":
        self._workspace = tempfile.TemporaryDirectory(prefix="azurite-")
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        self._process = subprocess.Popen(
            [str(self.binary), "--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence",
             "--extentMemoryLimit", "512", "--skipApiVersionCheck", "--loose", "--silent", "--disableTelemetry"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=self._workspace.name)
        self._watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(self._process.pid)],
                                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while self.port is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"Azurite did not start in {self.start_timeout:g} s: {self.output()}") from None
            if line is None:
                raise RuntimeError(f"Azurite exited with {self._process.wait()}: {self.output()}")
            match = _LISTENING.search(line)
            if match:
                self.port = int(match.group(1))
        self._wait_until_answering(deadline)

    def _drain(self, lines: queue.Queue) -> None:
        # Keeps reading after start-up, so a full pipe never blocks the emulator.
        for line in self._process.stdout:
            self._output.append(line.rstrip())
            lines.put(line)
        lines.put(None)

    def _wait_until_answering(self, deadline: float) -> None:
        while True:
            try:
                urllib.request.urlopen(f"{self.blob_endpoint}?comp=list", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer (403 without credentials) means it serves requests
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Azurite does not answer on port {self.port}: {self.output()}") from None
                time.sleep(0.1)

    def output(self) -> str:
        return " | ".join(self._output[-20:]) or "(no output)"

    def __exit__(self, *exc) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._watchdog is not None:
            self._watchdog.stdin.close()
            self._watchdog.wait()
        if self._workspace is not None:
            self._workspace.cleanup()
