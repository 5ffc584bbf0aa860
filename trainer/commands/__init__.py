"""One module per `latent-rewards` sub-command; each defines `add_parser(subparsers)` and `run(args)`."""
