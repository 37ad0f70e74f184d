"""The training engine: one teacher pass per micro-batch, a list of heads that train on it.

runtime (device, AMP) · schedule (optimiser, warm-up + poly) · checkpoint (atomic, versioned I/O)
· head (one configuration's student and everything it owns) · hooks (logging, validation,
checkpoints, callbacks) · trainer (the loop). Nothing here imports Ray, Optuna or MLflow.
"""
