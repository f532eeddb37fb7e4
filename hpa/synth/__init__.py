"""The synthetic HPA-like benchmark with single-cell ground truth (``python -m hpa.synth``)."""
