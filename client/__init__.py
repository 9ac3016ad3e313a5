"""`capydb-import`: the users' command-line client of the CapyDB Imports HTTP API.

It talks to the API only (never to the service's database, queue or code): it uploads
dumps through the presigned form the API hands out, starts and follows imports, and
prints preflight checks and import reports.
"""
