"""Pipeline stages: each a thin `run(params)` over the library, a `python -m tasks.<stage>`
entry point that dvc.yaml calls, and a Prefect task wrapper in `flows/`."""
