"""
C{python -m migrate}: the control channel's command-line client
(C{status}, C{upgrade}); see L{migrate._cli}.
"""

from migrate._cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
