"""MLflow around the pipeline (layer 2): `runs` (one run per stage, tags, params, lineage),
`models` (logged and registered models), `ui` (what the MLflow UI opens on)."""
