# The service image: Python, the project, and the PostgreSQL client tools it drives.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client-15 util-linux \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /srv
COPY setup.cfg pyproject.toml README.md ./
COPY app app
COPY pipeline pipeline
COPY stages stages
COPY client client
RUN pip install --no-cache-dir .
ENV CAPY_BIND_HOST=0.0.0.0 PORT=8000
EXPOSE 8000
CMD ["sh", "-c", "gunicorn --bind ${CAPY_BIND_HOST}:${PORT} --workers ${WEB_CONCURRENCY:-2} --worker-class gthread --threads 4 --timeout 30 --control-socket ${XDG_RUNTIME_DIR:-/tmp}/capy-imports-web-${PORT}.ctl 'app.wsgi:get_app()'"]
