"""The demo, the benchmark, plots and README tables."""
