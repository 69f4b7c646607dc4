"""Figures of the probes: one module per probe, figures only."""
