"""Reports: training-log parsing, plots, Grad-CAM and the run report."""
