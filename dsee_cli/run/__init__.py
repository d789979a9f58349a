"""One run, start to end: its plan (plan), the training loop (train), the executor (pipeline),
its checkpoint (checkpoint), steps shared between runs (steps), the task it trains (task), the
exports (export), and evaluating an export again (evaluation)."""
