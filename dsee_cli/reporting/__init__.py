"""What people read: a sweep as the paper's table (report) and figures (plots), and the terminal
and W&B while a run trains (tracking)."""
