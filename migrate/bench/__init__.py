"""
The migrate benchmark: C{python -m migrate.bench}.

It starts a real C{twistd migrate-host}, drives a load against it
(long-lived clients exchanging numbered lines and a steady rate of new
short connections), migrates it with each strategy, and compares what
users saw with two baselines: a naive stop-and-start of the same service,
and the raw cost of moving the same number of connections with nothing but
C{send_fds}.  See C{doc/performance.rst}.
"""

__all__: list[str] = []
