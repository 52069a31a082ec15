"""Training a network: the data sets (`data`), the run's configuration and its command-line flags (`config`), the
training loop and its checkpoints (`train`)."""
