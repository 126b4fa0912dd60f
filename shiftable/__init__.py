"""The program on top: the `sma` command and `sma up`'s supervisor.

The one package that imports every layer (library, services, gateway, benchmarks); nothing
imports it.
"""
