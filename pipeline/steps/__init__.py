"""One module per stage of an import: what a stage does with a job, called by the
stage methods of `pipeline.import_steps.ImportSteps` (the glue the Runner drives)."""
