"""Model registry: registration with lineage, the promotion gate, approvals, rollback, serving.

Importing this package is cheap (no MLflow, no torch); the modules import them inside their
functions. Entry points (docs/registry.md):

- `register.register_candidate(params, candidate)`: gate + MLflow version + `challenger`
- `gate.evaluate_gate(metrics, gate_params, champion)`: the pure verdict
- `approval.approve / reject / rollback / registry_status`: the champion's moves, locked
- `serving.predict(params)`: load `models:/<name>@champion` and run one agent episode
- `client.open_registry(tracking_params)`: the handle the functions above take
- `history.py` (champion stack and event log), `locking.py` (file / registered-model lock),
  `lineage.py` (dvc.lock hashes), `commands.py` (the CLI commands, attached in `tracetune.cli`)
"""
