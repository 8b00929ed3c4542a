"""
The host service: the process-side of migrate that owns an application's
listeners, knows its connections, keeps the pidfile and finds its
inheritance.
"""
