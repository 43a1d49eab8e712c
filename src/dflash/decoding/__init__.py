"""Decoding engines: the eager HF loop, the fast static-cache engine, SGLang servers; benchmark metrics."""
