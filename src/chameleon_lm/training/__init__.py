"""Training: losses, schedules, optimizer set-up and the training loop."""
