"""Command-line subcommands: each module ``vlpeft_jax.cli.<name>`` has ``main(argv) -> int``."""
