"""Benchmark suites behind `amskv bench SUITE`: each writes JSON, a Markdown table and PNG plots."""
