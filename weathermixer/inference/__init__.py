"""Forecasts from a checkpoint: rollout on any mesh, written in the WeatherBench 2 layout (forecast: the
CLI; inputs, rollout, store: its steps)."""
