"""What each DVC stage does, one module per stage, as functions the thin scripts in pipelines/ call and
tests call directly. Nothing is imported here: a stage's import closure is its own module's (dvc.yaml deps).

Paths come from the command line (dvc.yaml), knobs from the validated params; every output is written atomically.
"""
