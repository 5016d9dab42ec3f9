"""Evaluation: judge, GenEval-style score, FID via torch-fidelity, captioning, text bits per byte."""
