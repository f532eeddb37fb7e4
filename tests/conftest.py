"""Shared by every test folder: tests/ is on sys.path (helpers such as tiny_fields import from it)."""
