"""The pipeline config: `schema` (the pydantic model of the YAML), `loading` (YAML and `--set`),
`reference` (the Markdown reference generated from the schema)."""
