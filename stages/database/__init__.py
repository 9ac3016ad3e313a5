"""A Postgres database as the service administers and inspects it: the cluster, settings, inventory."""
