"""Training: inputs -> data -> rows -> loop -> weights archive; run.py reads top to bottom."""
