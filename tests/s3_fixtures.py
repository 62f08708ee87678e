"""Fixtures for tests that need S3: a real moto server on 127.0.0.1 (filled in by the S3 tests)."""
