"""Planning: phase configs (schema, defaults), stage keys and the run plans, result paths."""
