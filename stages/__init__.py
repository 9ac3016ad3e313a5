"""The work of an import: Postgres tooling, object storage and checks.

Nothing here knows about HTTP, the job table or the queue; callers pass in what a
stage needs (URLs, paths, limits) and get results or a `stages.errors` exception.
"""
