"""Benchmark harnesses, kept out of the library: each is a command, `python -m bench.<name>`.

- `bench.decode`: decode and training speed against Hugging Face GPT-2 (`sma bench`);
- `bench.stack`: a live `sma up` stack, in-process vs gRPC vs SSE, and add times;
- `bench.train`: training throughput and MFU of a profile, on one process or under torchrun;
- `bench.incremental_vs_full`: the incremental add against the full retrain, on a trained home.
"""
