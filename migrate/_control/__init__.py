"""
The control channel: the AMP commands an operator's client sends to a
running host, and the server that answers them.
"""
