"""``python -m efla`` runs the command line (also under torchrun)."""

from efla.cli import main

main()
