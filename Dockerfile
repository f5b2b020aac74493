# One image for every service in docker-compose.yml: migrate, worker, beat, flower,
# simulator and demo. Only the process started differs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The dependencies, at the versions in the lock, get a layer of their own, so a code change
# does not reinstall them.
COPY requirements.lock /tmp/requirements.lock
RUN pip install -r /tmp/requirements.lock && rm /tmp/requirements.lock

# The package itself, installed like any library (its migrations ship inside it); the
# source is removed after, so nothing runs from a checkout.
COPY pyproject.toml README.md /tmp/src/
COPY config /tmp/src/config
COPY worker /tmp/src/worker
RUN pip install --no-deps /tmp/src \
    && rm -rf /tmp/src \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin cascade \
    && install -d -o cascade /var/lib/cascade-metrics  # PROMETHEUS_MULTIPROC_DIR (compose)

# The code is owned by root and read-only for the app; it writes only to /tmp and $HOME.
USER cascade
WORKDIR /home/cascade

CMD ["celery", "-A", "worker", "worker", "-l", "info"]
