"""The copy engine: a live source streamed into the preview, table by table, in parallel.

- `catalog`: what the source's snapshot holds to copy (tables, columns, sizes) and which
  table each post-data object (index, constraint, foreign key) belongs to;
- `postdata`: the post-data SQL of a schema archive, one block per TOC entry;
- `stream`: one table's `COPY … TO STDOUT` on the source into `COPY … FROM STDIN` on the
  preview, through a pipe, with both sides' row counts;
- `scheduler`: runs tasks on N lanes, longest remaining chain first, never two that
  would wait on each other's locks;
- `engine`: the whole copy of a live import, from one exported snapshot.
"""
