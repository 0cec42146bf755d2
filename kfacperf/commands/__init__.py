"""One module per subcommand: ``configure(parser)`` and ``run(args) -> int``; no heavy imports at module level."""
