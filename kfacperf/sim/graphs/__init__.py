"""Step graphs: what each simulated rank runs in one step, per strategy, and where layers go."""
