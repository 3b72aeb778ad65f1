"""The built-in small model, installed with the package as `cvae_cli.weights` (see README.md here)."""
