"""transfusion: train and evaluate Transfusion models as a reproducible pipeline.

Importing this package is cheap; heavy modules (torch, transformers, diffusers, mlflow, ray)
are imported by the submodules that need them.
"""

__version__ = "0.1.0"
