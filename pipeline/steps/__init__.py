"""The stages of an import, one module each (`preflight`, `fetch`, `restore`,
`finalize`), in the order of `registry`, each returning its result model (`results`):
the glue between a job row and the Postgres toolkit in `stages`. fetch and restore
call the half for their kind of source (`live`, `upload`). The Runner drives them
through `pipeline.import_steps.ImportSteps`, which holds what they share."""
