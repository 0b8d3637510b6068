"""Simulation: Monte Carlo load-imbalance study, operator-level inference performance model, hardware
profiles, local-CPU calibration and model-configuration search. numpy only; torch is imported solely
by :mod:`moge.sim.calibrate`."""
