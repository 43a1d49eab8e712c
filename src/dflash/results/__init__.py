"""Results: provenance and atomic directories, the report, the audit, gc and publishing."""
