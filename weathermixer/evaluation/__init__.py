"""Scores like WeatherBench 2: metrics, the evaluation CLI, plots and the scorecard."""
