"""Benchmark suites, benchmarks and baselines of sparse-zmq.

``bench/suites/*.json`` describe the paper's deployment suites (which
processes run, which partition each holds, which broker joins them); the
``sparse-zmq run`` command starts a suite on this machine.
"""
