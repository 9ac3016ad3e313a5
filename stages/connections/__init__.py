"""Reaching Postgres: connection URLs, the address gate, connections and their deadlines."""
