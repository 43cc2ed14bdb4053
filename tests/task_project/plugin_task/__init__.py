"""A user's task project for tests/test_task_plugin.py: importable only from this directory."""
