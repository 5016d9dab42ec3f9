"""One thin module per DVC stage: ``run(params)`` loads inputs, calls the library once, writes
outputs, metrics and plots under ``paths:``, and tracks the run in MLflow."""
