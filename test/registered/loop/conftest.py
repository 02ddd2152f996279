"""Fixtures the loop tests share; pytest finds them here, so test files only name them as parameters."""

from loop_helpers import files as files  # the module-scoped Ray cluster + task fixture (explicit re-export)
