"""Sandbox providers: where a sandbox runs. Each module speaks to one engine."""
