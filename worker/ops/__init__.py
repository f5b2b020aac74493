"""Operator tooling: the `cascade` command line and the campaign reports."""
