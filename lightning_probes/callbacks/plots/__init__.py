"""Figures of the probes: one module per probe, drawn on bare matplotlib figures."""
