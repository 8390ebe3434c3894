"""The policy file: pydantic models of every section, loading, schema and reference doc."""
