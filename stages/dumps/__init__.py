"""Reading dumps: formats, tables of contents, plain SQL scripts and the rows they hold."""
