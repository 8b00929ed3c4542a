"""
Rolling upgrade across the servers of an HAProxy backend (C{python -m
migrate rolling}): not an L{migrate.interfaces.IMigrationStrategy} but an
orchestrator of hosts.
"""
