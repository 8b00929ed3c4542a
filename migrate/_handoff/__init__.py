"""
What every strategy composes: the successor process, descriptor passing,
listener and connection hand-off, deadlines.
"""
