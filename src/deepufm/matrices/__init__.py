"""The deep-learning matrices of the paper (THEORY §5), exact and structured where possible."""
