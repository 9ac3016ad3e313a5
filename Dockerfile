# The service image: Python, every package of the project (app, pipeline, stages,
# client) and the PostgreSQL client tools it drives; it runs as a user of its own.
# The base is pinned by tag and digest (multi-arch index); bump both together.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
# util-linux: setpriv, which gives every tool a parent-death signal (stages/tools/commands.py).
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client-15 util-linux \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /srv
COPY setup.cfg pyproject.toml README.md ./
COPY app app
COPY pipeline pipeline
COPY stages stages
COPY client client
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /home/capy capy \
 && mkdir -p /work /metrics \
 && chown capy:capy /work /metrics
# /work and /metrics are owned by the service's user, so a new named volume mounted
# there (compose) starts owned by it too.
ENV CAPY_BIND_HOST=0.0.0.0 PORT=8000 CAPY_WORK_DIR=/work PYTHONUNBUFFERED=1
USER capy
EXPOSE 8000
# The Procfile's web process, as one command: app/gunicorn_conf.py binds
# $CAPY_BIND_HOST:$PORT and sets gunicorn's timeout above the synchronous preflight's
# limit (CAPY_PREFLIGHT_DEADLINE_SECONDS and CAPY_PREFLIGHT_COMMAND_TIMEOUT_SECONDS).
CMD ["sh", "-c", "exec gunicorn -c python:app.gunicorn_conf --workers ${WEB_CONCURRENCY:-2} --worker-class gthread --threads 4 --control-socket ${XDG_RUNTIME_DIR:-/tmp}/capy-imports-web-${PORT}.ctl 'app.wsgi:get_app()'"]
