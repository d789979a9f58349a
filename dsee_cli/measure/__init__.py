"""What a model costs: counted (accounting: trainable parameters, FLOPs) and measured (costs:
time, memory, size, against the dense model)."""
