"""Worked examples: the users' own workflows run against a running aeserve service."""
