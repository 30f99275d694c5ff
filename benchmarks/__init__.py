"""Benchmarks: the real server beside a bare-aiohttp reference, measured in one run."""
