"""The demo: a labelled deepfake set built from photos that installed packages ship
(``dataset``), and the runner that takes it through every stage script (``run``).
Not used by the stage scripts."""
