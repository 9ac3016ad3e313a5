"""Keep the worker's file paths out of what users see.

Tools name the files they were given: psql prefixes each error with
``psql:/tmp/capy-imports/job_…/dump.sql:123:``, pg_restore names its archive and its
``--use-list`` file. A user needs to know *which* input failed, not where a worker
keeps it (its work directory, job layout, other jobs' names), so every path inside a
job's work directory (``…/job_<id>/…``, also inside a stage's folder there,
``…/job_<id>/restore-<random>/…``) or a preflight's scratch directory
(``…/preflight-<random>/…``) becomes a neutral name: ``<dump>``, ``<restore list>`` or
``<work file>``. The shapes are those `pipeline.import_steps` and `pipeline.preflights`
create, whatever CAPY_WORK_DIR is.
"""

from __future__ import annotations

import re

DUMP = "<dump>"
RESTORE_LIST = "<restore list>"
WORK_FILE = "<work file>"

# A job's or preflight's directory inside a path; the path around it runs to a character
# that cannot be part of one in tool output (whitespace, a quote, the ":" after psql's
# file name). Found by this literal-led search, then extended by scanning, so the work
# stays linear on long lines full of slashes.
_MARK = re.compile(r"/(?:job_[0-9a-z]+|preflight-[0-9A-Za-z_]+)(?=[/\s:'\"]|$)")
_REST = re.compile(r"""(?:/[^\s/:'"]+)*/?""")
_DELIMITERS = frozenset(" \t\n\r\f\v:'\"")
# What the import and preflight stages call their files (pipeline.import_steps,
# pipeline.preflights): the upload, the prepared SQL, a directory dump and its members.
_DUMP_FILES = frozenset({"upload", "upload.part", "dump.sql", "dump", "head"})
_STAGE_FOLDER = re.compile(r"(?:fetch|restore)-[0-9A-Za-z_]+")


def scrub_work_paths(text: str) -> str:
    """`text` with every work-directory path replaced by a neutral name."""
    if not text or "/" not in text:
        return text
    out: list[str] = []
    done = 0
    for mark in _MARK.finditer(text):
        if mark.start() < done:
            continue  # inside a path already replaced
        start = mark.start()
        while start > done and text[start - 1] not in _DELIMITERS:
            start -= 1
        rest = _REST.match(text, mark.end())
        end = rest.end() if rest else mark.end()
        out.append(text[done:start])
        out.append(_name(text[mark.end() : end]))
        done = end
    out.append(text[done:])
    return "".join(out)


def _name(rest: str) -> str:
    parts = [part for part in rest.split("/") if part]
    if parts and _STAGE_FOLDER.fullmatch(parts[0]):
        parts = parts[1:]  # a stage's own folder in the job's (pipeline.steps.upload)
    if not parts:
        return WORK_FILE
    if parts[-1] == "restore.list":
        return RESTORE_LIST
    if parts[0] in _DUMP_FILES:
        return DUMP
    return WORK_FILE
