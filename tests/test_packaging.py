"""The package as a user gets it: a wheel, installed outside the checkout, migrates.

The wheel is built from a copy of what the sdist would hold, and installed with `--no-deps`
into a fresh venv (no pip of its own) in a temporary directory. Its third-party
dependencies come from this venv's site-packages, appended by a `.pth` line: a plain path
entry, so the `.pth` files there (the editable install's hook onto this checkout) are
never run. Resolving them from an index would take a minute and test pip, not us.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from sqlalchemy import create_engine, inspect, text

from tests.conftest import create_postgres_database, drop_postgres_database

ROOT = Path(__file__).resolve().parent.parent
TABLES = {"messages", "message_events", "campaigns", "callbacks", "alembic_version"}


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv, outside the checkout, with the wheel installed; answers its bin/ directory."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("worker", "config"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", base / "dist", source, cwd=base)
    (wheel,) = (base / "dist").glob("cascade_worker-*.whl")

    venv = base / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=base)
    python = venv / "bin" / "python"
    run(*pip, "--python", python, "install", "--no-deps", "--no-index", wheel, cwd=base)
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=base)
    Path(purelib.strip(), "third-party.pth").write_text(sysconfig.get_path("purelib") + "\n")
    yield venv / "bin"


def clean_env(**values: str) -> dict[str, str]:
    """No PYTHONPATH, no settings of the test process: only what a new user's shell has."""
    return {"PATH": os.environ["PATH"], "HOME": str(Path.home()), **values}


def test_the_wheel_runs_from_its_venv_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = run(installed / "python", "-c", "import worker; print(worker.__file__)", cwd=tmp_path)
    assert Path(where.strip()).is_relative_to(installed.parent)
    assert not Path(where.strip()).is_relative_to(ROOT)


DATA_FILES = [  # loaded by path, not imported: easy to leave out of a wheel
    "store/migrations/script.py.mako",
    "store/migrations/versions/0001_messages_and_events.py",
    "http/static/swagger-ui/swagger-ui-bundle.js",
    "http/static/redoc/redoc.standalone.js",
    "http/static/redoc/LICENSE",
]


def test_the_wheel_carries_its_data_files(installed: Path, tmp_path: Path) -> None:
    script = (
        "from importlib.resources import files; "
        f"print([p for p in {DATA_FILES!r} if not files('worker').joinpath(p).is_file()])"
    )
    assert run(installed / "python", "-c", script, cwd=tmp_path).strip() == "[]"


def migrate_and_list_tables(installed: Path, cwd: Path, url: str) -> set[str]:
    out = run(installed / "cascade", "db", "upgrade", cwd=cwd, env=clean_env(DATABASE_URL=url))
    assert "database at revision head" in out
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            assert revision is not None
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_the_installed_wheel_migrates_sqlite(installed: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert migrate_and_list_tables(installed, tmp_path, url) >= TABLES


def test_the_installed_wheel_migrates_postgresql(installed: Path, tmp_path: Path) -> None:
    name = create_postgres_database()
    try:
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        assert migrate_and_list_tables(installed, tmp_path, url) >= TABLES
    finally:
        drop_postgres_database(name)


@pytest.mark.unit
def test_postgresql_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg is the `postgres` extra: a SQLite install without it is told what to add."""
    from pydantic import ValidationError

    from config import Settings

    monkeypatch.setitem(sys.modules, "psycopg", None)  # what `import psycopg` finds missing
    assert Settings(_env_file=None, DATABASE_URL="sqlite:///x.db").database_url  # type: ignore[call-arg]
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None, DATABASE_URL="postgresql://u:hunter2@h/db")  # type: ignore[call-arg]
    assert "DATABASE_URL" in str(info.value)
    assert "cascade-worker[postgres]" in str(info.value)
    assert "hunter2" not in str(info.value)


def pins(lock: str) -> dict[str, str]:
    """`name==version` lines of a pip-tools lock, by canonical name."""
    found = {}
    for line in (ROOT / lock).read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#", "-")):
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = version.strip()
    return found


@pytest.mark.unit
@pytest.mark.parametrize(
    ("lock", "extras"),
    [
        ("requirements.lock", ["postgres", "flower"]),
        ("requirements-dev.lock", ["postgres", "flower", "dev"]),
    ],
)
def test_the_locks_pin_every_dependency(lock: str, extras: list[str]) -> None:
    """The image and install.sh install only the lock: a dependency added to pyproject.toml
    and not locked would be missing there (README: Dependencies says how to refresh)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"]]
    wanted += [r for extra in extras for r in project["optional-dependencies"][extra]]
    pinned = pins(lock)
    stale = []
    for line in wanted:
        requirement = Requirement(line)
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            stale.append(f"{requirement} (locked: {version})")
    assert stale == [], f"{lock} is stale, refresh it: {stale}"


@pytest.mark.unit
def test_the_dev_lock_keeps_the_runtime_pins() -> None:
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    assert {name: dev.get(name) for name in runtime} == runtime
