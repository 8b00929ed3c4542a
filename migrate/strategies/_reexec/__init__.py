"""
Re-exec: checking, describing, executing and restoring a host in place
(same PID).
"""
