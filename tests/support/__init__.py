"""Test support code shared by the test suites (scripted model server, helpers)."""
