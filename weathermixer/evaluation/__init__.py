"""Scores like WeatherBench 2: metrics, the evaluation CLI, plots and the scorecard.

metrics     latitude-weighted RMSE, bias, ACC and the day-of-year x hour climatology
plan        what is evaluated: opening the data, checking forecast against truth, the Plan
baselines   persistence and climatology forecasts, the climatology's training period
evaluate    the `python -m weathermixer.evaluate` CLI and the scoring loop
report      metrics.json, metrics.csv and the figures of a report directory
plots       one function per figure (headless matplotlib)
scorecard   our scores beside the WeatherBench table (docs/reference_scores.md in the source repository)
"""
