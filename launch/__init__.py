"""Thin entry points: argument parsing and wiring only; the logic lives in train/, data/, eval/."""
