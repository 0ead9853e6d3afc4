"""Prefect flows: compose the stages in `tasks/`; no stage logic lives here."""
