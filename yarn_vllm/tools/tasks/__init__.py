"""Checkable long-context tasks (passkey retrieval) shared by `generate` and `eval`."""
