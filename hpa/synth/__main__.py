"""``python -m hpa.synth OUT [--n-train N] [--n-test N] [--size S] [--seed K]``: write a synthetic data set."""

from hpa.synth.generate import main

main()
