"""
The control channel: the AMP commands an operator's client sends to a
running host (L{migrate._control._commands}), the server that answers them
(L{migrate._control._server}, with its bounds on what a client may send in
L{migrate._control._limits}), and the client that the C{python -m migrate}
commands and the rolling upgrade share (L{migrate._control._client}).
"""
