"""Experiments that combine measurement (`forward_influence`) and compression (`kv_compression`).

Each module has importable functions and a ``python -m analyses.<name>`` entry point that writes CSV
tables and seaborn figures.
"""
