"""
A randomized fault campaign: C{python -m migrate.chaos --rounds N --seed S}.

Under load, each round picks a strategy and a fault, injects the fault at
a random moment of a migration, and checks what migrate promises: the
service answers, no connection is lost that was not owned by a killed
process, no process or descriptor is left behind, and the report says
what happened.  See C{doc/reliability.rst}.
"""
