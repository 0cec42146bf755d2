"""Traces: the event table's schema, a trace directory's reading and writing, crash-safe
per-rank parts, what a run measured (step and stage times), summaries and Chrome export.

Never imports torch."""
