"""Pretraining: the step loop (trainer), optimizer, evaluation, metrics, logging and the loss plot."""
