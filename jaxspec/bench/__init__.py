"""``python -m jaxspec.bench``: serving benchmarks (latency distributions under load, speculation
settings and targets side by side) and ``predict`` (step times and speculative speed-up on
accelerators from a roofline). See ``jaxspec/bench/cli.py`` and ``docs/benchmarks.md``."""
