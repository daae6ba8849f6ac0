"""``python -m medvae`` (and ``accelerate launch -m medvae``) run the CLI."""

from medvae.cli import main

main()
