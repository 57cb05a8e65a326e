"""Experiments that train: each generates synthetic data, runs train.py as a subprocess, samples and
scores the result. demo.py (`make demo`, `python -m experiments.demo`): RetriNet learns to retrieve
identities on the CPU; leakage.py (`make leakage`, `python -m experiments.leakage`): the paper's leakage
benchmark in miniature. recipe.py holds what they share (data, the training recipe), child.py how
train.py runs under them (signals passed on)."""
