"""``python -m titan.demo``: build the demo data set (see titan.demo.dataset)."""
from .dataset import main

main()
