"""Model backends: each turns a job's spec into a stream of token texts."""
