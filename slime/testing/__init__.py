"""Test registration, suite collection, partitioning and the suite runner's internals."""
