"""Every fit of a model to measurements: device models from traces, cluster models from
commbench (alpha-beta per collective and the host probes), and their numerical helpers.

Never imports torch."""
