"""Agent backends: which CLI runs in the sandbox and how its output is read."""
