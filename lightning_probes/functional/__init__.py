"""Pure tensor math of the probes: no Lightning, no hooks, no logging, no I/O."""
