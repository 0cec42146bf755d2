"""The discrete-event performance model (never imports torch)."""
