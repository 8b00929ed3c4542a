"""
Rolling upgrade across the servers of an HAProxy backend (C{python -m
migrate rolling}): not an L{migrate.interfaces.IMigrationStrategy} but an
orchestrator of hosts.

The roll itself (L{migrate._rolling._orchestrator}), how each server is
upgraded (L{migrate._rolling._upgraders}), what the roll reports
(L{migrate._rolling._report}), its command line
(L{migrate._rolling._command}) and the client of HAProxy's runtime API
(L{migrate._rolling._haproxy}).
"""
