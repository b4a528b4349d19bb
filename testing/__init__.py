"""Helpers shared by tests/ and benchmarks/: a real gunicorn on loopback, image bytes, small models.

A package of its own (not inside tests/) so benchmarks import no test modules, and not
installed with the service: both callers put the project root on ``sys.path``.
"""
