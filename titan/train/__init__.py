"""Training: the session, one epoch function, SimMIM, k-fold fine-tuning and the stage pipeline."""
