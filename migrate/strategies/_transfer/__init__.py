"""
Hand-off to a successor process over the hand-off channel: the shared
machinery of capability and gradual transfer.
"""
