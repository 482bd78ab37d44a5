"""Reports: the demo, the benchmark (``bench``), plots and README tables."""
