"""Apply the migrations: `cascade db upgrade`, the demo, the tests and the benchmarks."""

from __future__ import annotations

from importlib.resources import as_file, files

from alembic import command
from alembic.config import Config


def upgrade_database(url: str, revision: str = "head") -> None:
    """The migrations ship inside the package, so any install (wheel, image) can migrate."""
    config = Config()
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with as_file(files("worker.store") / "migrations") as location:
        config.set_main_option("script_location", str(location).replace("%", "%%"))
        command.upgrade(config, revision)
