"""Real servers for the integration tests, started once per session on free 127.0.0.1 ports.

Without Docker (this project's usual case) the fixtures launch local binaries through
``ops.dev.services``: a Kafka-protocol broker (noida-db, or tansu), redis-server, moto (S3) and
Debian's clickhouse-server. When a Docker engine answers (``docker info`` exits 0) the same
fixtures run testcontainers instead (Apache Kafka, Redis, MinIO, ClickHouse).

Environment knobs:

* ``GATEWATCH_TEST_KAFKA_BOOTSTRAP`` / ``GATEWATCH_TEST_CLICKHOUSE_URL`` /
  ``GATEWATCH_TEST_REDIS_URL`` / ``GATEWATCH_TEST_S3_ENDPOINT``: use an external server.
* ``GATEWATCH_TEST_BROKER=noida|tansu``: which local broker backs ``kafka_bootstrap``
  (default noida; ``tansu_bootstrap`` is always tansu).
* ``GATEWATCH_TEST_S3=moto|rclone``: which local S3 server backs ``s3_endpoint``.
* ``GATEWATCH_TEST_DOCKER=0``: never use Docker even if it answers.
* ``GATEWATCH_TEST_REQUIRE_SERVICES=1``: a server that cannot start fails the tests that
  need it instead of skipping them (for CI, where every server must be there).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import pytest

from ops.dev import services as svc
from ops.migrate import migrate_kafka
from ops.settings import KafkaSettings

SERVER_FIXTURES = frozenset({"kafka_bootstrap", "tansu_bootstrap", "redis_url", "s3_endpoint",
                             "clickhouse_url", "topic_factory", "kafka_kind"})
S3_ACCESS_KEY, S3_SECRET_KEY = "gatewatch", "gatewatch-secret"  # MinIO wants >= 8 chars
STARTUP_TIMES: dict[str, float] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs real local servers (started by fixtures)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that uses a server fixture is an integration test (`-m "not integration"`)."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if STARTUP_TIMES:
        timings = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in STARTUP_TIMES.items())
        terminalreporter.write_line(f"test servers started: {timings}")


@functools.cache
def docker_available() -> bool:
    """A Docker engine answers (not just a docker CLI on PATH)."""
    if os.environ.get("GATEWATCH_TEST_DOCKER", "").lower() in ("0", "false", "no", "off"):
        return False
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=20, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _unavailable(reason: str) -> None:
    if os.environ.get("GATEWATCH_TEST_REQUIRE_SERVICES", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (GATEWATCH_TEST_REQUIRE_SERVICES is set)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory: pytest.TempPathFactory):
    """Data and log directories of the servers this session starts."""
    return tmp_path_factory.mktemp("servers")


@contextlib.contextmanager
def _local(label: str, start: Callable[[], svc.Service]) -> Iterator[svc.Service]:
    began = time.monotonic()
    try:
        service = start()
    except svc.ServiceUnavailable as exc:
        _unavailable(f"{label} could not start: {exc}")
    STARTUP_TIMES[label] = time.monotonic() - began
    try:
        yield service
    finally:
        service.stop()


@contextlib.contextmanager
def _container(label: str, make: Callable[[], object]) -> Iterator:
    """Build and start a testcontainers container (building one already talks to the
    engine), stop it afterwards; skip if it cannot start."""
    began = time.monotonic()
    try:
        container = make()
        container.start()
    except Exception as exc:  # noqa: BLE001 - image pull, engine errors: the message says which
        _unavailable(f"{label} container could not start: {exc!r}")
    STARTUP_TIMES[f"{label} (docker)"] = time.monotonic() - began
    try:
        yield container
    finally:
        container.stop()


def _testcontainer(module: str, name: str):
    """testcontainers >= 4.10 keeps most modules under ``testcontainers.community``."""
    import importlib

    for path in (f"testcontainers.community.{module}", f"testcontainers.{module}"):
        with contextlib.suppress(ImportError, AttributeError):
            return getattr(importlib.import_module(path), name)
    _unavailable(f"testcontainers has no {name} (pip install 'testcontainers>=4.15')")


# --------------------------------------------------------------------------- kafka


@pytest.fixture(scope="session")
def kafka_kind() -> str:
    """What backs ``kafka_bootstrap``: external, docker, noida or tansu."""
    if os.environ.get("GATEWATCH_TEST_KAFKA_BOOTSTRAP"):
        return "external"
    if docker_available():
        return "docker"
    kind = os.environ.get("GATEWATCH_TEST_BROKER", "noida").lower()
    if kind not in ("noida", "tansu"):
        pytest.fail(f"GATEWATCH_TEST_BROKER must be noida or tansu, not {kind!r}", pytrace=False)
    return kind


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_kind: str, servers_dir) -> Iterator[str]:
    """``host:port`` of a Kafka-protocol broker for the whole session."""
    if kafka_kind == "external":
        yield os.environ["GATEWATCH_TEST_KAFKA_BOOTSTRAP"]
    elif kafka_kind == "docker":
        kafka_container = _testcontainer("kafka", "KafkaContainer")
        with _container("kafka", lambda: kafka_container("confluentinc/cp-kafka:7.6.0").with_kraft()) as c:
            yield c.get_bootstrap_server()
    else:
        with _local(f"kafka ({kafka_kind})", lambda: svc.start_kafka(
                servers_dir / f"kafka-{kafka_kind}", kind=kafka_kind, die_with_parent=True)) as service:
            yield service.address


@pytest.fixture(scope="session")
def tansu_bootstrap(servers_dir) -> Iterator[str]:
    """``host:port`` of a tansu broker (memory only), for smoke tests on the second broker."""
    with _local("kafka (tansu, smoke)", lambda: svc.start_kafka(
            servers_dir / "kafka-tansu-smoke", kind="tansu", die_with_parent=True)) as service:
        yield service.address


@pytest.fixture(scope="session")
def topic_factory(kafka_bootstrap: str) -> Callable[..., str]:
    """``make(partitions=1, prefix="test", config=None) -> name``: a new, unique topic."""

    def make(partitions: int = 1, prefix: str = "test", config: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        svc.create_topics(kafka_bootstrap, {name: partitions}, config=config)
        return name

    return make


@pytest.fixture(scope="session")
def flow_topics_env(kafka_bootstrap: str) -> Callable[..., dict[str, str]]:
    """``make(partitions) -> env``: GATEWATCH_KAFKA__* variables of a flow reading a new events
    topic to its end, with every other pipeline topic new too, created by ``gatewatch migrate``'s
    own runner."""

    def make(partitions: int = 2) -> dict[str, str]:
        suffix = uuid.uuid4().hex[:12]
        names = {name: f"test-{name.lower().replace('_', '-')}-{suffix}"
                 for name in ("EVENTS", "DLQ", "BILLING", "QUOTA_ALERTS", "FEEDBACK")}
        migrate_kafka(KafkaSettings(bootstrap=kafka_bootstrap, partitions=partitions,
                                    **{f"{name.lower()}_topic": topic for name, topic in names.items()}))
        return {"GATEWATCH_KAFKA__BOOTSTRAP": kafka_bootstrap, "GATEWATCH_KAFKA__TAIL": "false",
                **{f"GATEWATCH_KAFKA__{name}_TOPIC": topic for name, topic in names.items()}}

    return make


# --------------------------------------------------------------------------- redis


@pytest.fixture(scope="session")
def redis_url(servers_dir) -> Iterator[str]:
    """``redis://127.0.0.1:PORT/0`` of a Redis server for the whole session."""
    external = os.environ.get("GATEWATCH_TEST_REDIS_URL")
    if external:
        yield external
    elif docker_available():
        redis_container = _testcontainer("redis", "RedisContainer")
        with _container("redis", lambda: redis_container("redis:7.2-alpine")) as c:
            yield f"redis://{c.get_container_host_ip()}:{c.get_exposed_port(6379)}/0"
    else:
        with _local("redis", lambda: svc.start_redis(servers_dir / "redis", die_with_parent=True)) as service:
            yield service.address


# --------------------------------------------------------------------------- s3


def _wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            _unavailable(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.2)


@contextlib.contextmanager
def _minio() -> Iterator[str]:
    from testcontainers.core.container import DockerContainer

    def make():
        return (DockerContainer("minio/minio:RELEASE.2024-12-18T13-15-44Z")
                .with_command("server /data")
                .with_env("MINIO_ROOT_USER", S3_ACCESS_KEY)
                .with_env("MINIO_ROOT_PASSWORD", S3_SECRET_KEY)
                .with_exposed_ports(9000))

    with _container("s3 (minio)", make) as c:
        endpoint = f"http://{c.get_container_host_ip()}:{c.get_exposed_port(9000)}"
        _wait_http(endpoint + "/minio/health/live")
        yield endpoint


@pytest.fixture(scope="session")
def s3_endpoint(servers_dir) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of an S3 server. For the session it also sets
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION (and the checksum
    settings rclone needs), so plain ``s3fs.S3FileSystem(client_kwargs={"endpoint_url": ...})``
    works."""
    env = pytest.MonkeyPatch()
    env.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    env.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3"):
        env.delenv(name, raising=False)
    kind = os.environ.get("GATEWATCH_TEST_S3", "moto").lower()
    try:
        external = os.environ.get("GATEWATCH_TEST_S3_ENDPOINT")
        if external:
            yield external
        elif docker_available():
            with _minio() as endpoint:
                yield endpoint
        else:
            if kind == "rclone":
                env.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
                env.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
            with _local(f"s3 ({kind})", lambda: svc.start_s3(
                    servers_dir / f"s3-{kind}", kind=kind, die_with_parent=True,
                    access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY)) as service:
                yield service.address
    finally:
        env.undo()


# --------------------------------------------------------------------------- clickhouse


@pytest.fixture(scope="session")
def clickhouse_url(servers_dir) -> Iterator[str]:
    """``clickhouse://[user:pass@]host:port[/db]`` of a ClickHouse server (native protocol).

    Locally this is Debian's 18.16: insert rows as parameters, never literal VALUES."""
    external = os.environ.get("GATEWATCH_TEST_CLICKHOUSE_URL")
    if external:
        yield external
    elif docker_available():
        clickhouse_container = _testcontainer("clickhouse", "ClickHouseContainer")
        with _container("clickhouse", lambda: clickhouse_container("clickhouse/clickhouse-server:24.8")) as c:
            yield c.get_connection_url()
    else:
        with _local("clickhouse", lambda: svc.start_clickhouse(
                servers_dir / "clickhouse", die_with_parent=True)) as service:
            yield service.address


# --------------------------------------------------------------------------- postgres


class PostgresServer:
    """Debian's PostgreSQL run as the `postgres` user from a temporary data directory (trust
    auth, socket in that directory) on a free 127.0.0.1 port; stop() and start() again
    simulate an outage."""

    def __init__(self, bin_dir: str, root: str, port: int):
        self.bin_dir, self.root, self.port = bin_dir, root, port
        self.process: subprocess.Popen | None = None
        self.url = f"postgresql://gatewatch@127.0.0.1:{port}/postgres"

    def _as_postgres(self, *command: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(command, user="postgres", group="postgres", extra_groups=[], cwd=self.root,
                                stdin=subprocess.DEVNULL, **kwargs)

    def init(self) -> None:
        initdb = self._as_postgres(f"{self.bin_dir}/initdb", "-D", f"{self.root}/data", "-U", "gatewatch",
                                   "--auth=trust", "-E", "UTF8", "--no-sync",
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if initdb.wait(120):
            raise svc.ServiceUnavailable(f"initdb failed: {initdb.stderr.read().decode()[-500:]}")

    def start(self, timeout: float = 60) -> None:
        import psycopg

        with open(f"{self.root}/postgres.log", "ab") as log:
            self.process = self._as_postgres(
                f"{self.bin_dir}/postgres", "-D", f"{self.root}/data", "-p", str(self.port), "-k", self.root,
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise svc.ServiceUnavailable(f"postgres did not start; see {self.root}/postgres.log") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT: fast shutdown, open sessions are cut
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def database(self, role: str = "gatewatch") -> tuple[str, str]:
        """A new database: (its owner's URL, its URL for `role`)."""
        import psycopg

        name = f"gw_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        base = self.url.rsplit("/", 1)[0]
        return f"{base}/{name}", f"{base.replace('gatewatch@', f'{role}@')}/{name}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server with a superuser `gatewatch` and a login role `gatewatch_app`."""
    import glob
    import tempfile

    bin_dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bin_dirs:
        _unavailable("PostgreSQL is not installed (apt-get install postgresql; see ops/setup-test-env.sh)")
    # pytest's temporary directories are private to root; the server's must belong to postgres.
    root = tempfile.mkdtemp(prefix="gatewatch-pg-")
    shutil.chown(root, "postgres", "postgres")
    server = PostgresServer(bin_dirs[-1], root, svc.free_port())
    began = time.monotonic()
    try:
        server.init()
        server.start()
    except (svc.ServiceUnavailable, OSError) as exc:
        server.stop()
        _unavailable(f"postgres could not start: {exc}")
    STARTUP_TIMES["postgres"] = time.monotonic() - began
    import psycopg

    with psycopg.connect(server.url, autocommit=True) as connection:
        connection.execute("CREATE ROLE gatewatch_app LOGIN")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
