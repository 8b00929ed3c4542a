"""
Module reload: loading new code into the running process and upgrading its
live protocols in place.
"""
