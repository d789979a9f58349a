"""What every phase needs and no method owns: architectures (arch), models (models), mixed
precision (precision), exact top-k (selection)."""
