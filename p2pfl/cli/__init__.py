"""Command line: the only place that reads argv, environment and files into config."""
