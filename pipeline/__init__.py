"""The job model, the queue and the operators' tools.

`pipeline` owns the control database (Peewee models and migrations), the job state
machine, the Dramatiq actors that chain the stages, and the `capy-imports` CLI. It
calls `stages` for the work itself and knows nothing of HTTP.
"""
