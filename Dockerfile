# One image for every service in docker-compose.yml: migrate, worker, beat, flower,
# simulator and demo. Only the process started differs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The dependencies get a layer of their own, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# `cascade db upgrade` reads alembic.ini and alembic/ from the folder above the `worker`
# package (worker/cli.py: ROOT). So the source tree stays in /app and is installed in place
# (-e). A copy in site-packages would look for them there, where `alembic` is the library.
COPY alembic.ini ./
COPY alembic ./alembic
COPY config ./config
COPY worker ./worker
RUN pip install --no-deps -e . \
    && python -m compileall -q config worker alembic \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin cascade \
    && install -d -o cascade /var/lib/cascade-metrics  # PROMETHEUS_MULTIPROC_DIR (compose)

# The code is owned by root and read-only for the app; it writes only to /tmp and $HOME.
USER cascade

CMD ["celery", "-A", "worker", "worker", "-l", "info"]
