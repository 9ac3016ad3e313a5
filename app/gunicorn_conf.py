"""gunicorn's settings for the web process: `gunicorn -c python:app.gunicorn_conf …`.

Read once, when gunicorn starts. Options on the command line override these
(Procfile.dev binds loopback that way).

- bind: every interface, on `$PORT` (8000 by default), as a platform that routes to the
  process expects; `CAPY_BIND_HOST` names another address (127.0.0.1 on a shared host).
- timeout: a request may take as long as the synchronous preflight (POST
  …/imports/preflight) may: CAPY_PREFLIGHT_DEADLINE_SECONDS for the source and the schema
  rehearsal, plus CAPY_PREFLIGHT_COMMAND_TIMEOUT_SECONDS for an upload's table of
  contents, plus a margin for the control database and storage. Below it, gunicorn
  would kill the worker thread's process mid-answer and the client would see a reset.
"""

from __future__ import annotations

import os

from pipeline.config import ConfigError, Settings

MARGIN_SECONDS = 15


def worker_timeout(settings: Settings) -> int:
    """Seconds gunicorn lets a request run: above the synchronous preflight's limit."""
    return settings.preflight_deadline_seconds + settings.preflight_command_timeout_seconds + MARGIN_SECONDS


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError:
        # The app reports the bad variable when it loads (app.wsgi.get_app); until then
        # the defaults give a timeout.
        return Settings()


bind = f"{os.environ.get('CAPY_BIND_HOST') or '0.0.0.0'}:{os.environ.get('PORT') or '8000'}"
timeout = worker_timeout(_settings())
