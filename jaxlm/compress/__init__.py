"""Making a trained model smaller or cheaper to adapt: each method a transform or an objective
through the one trainer (distill.py: a teacher's objective; prune.py: masks and smaller runs)."""
