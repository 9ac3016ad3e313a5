"""What each stage does for one kind of import: the glue between a job row and the
Postgres toolkit in `stages` (live sources in `live`, uploads in `upload`), called by
the stage methods of `pipeline.import_steps.ImportSteps` (which the Runner drives)."""
