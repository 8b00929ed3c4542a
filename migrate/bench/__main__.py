"""
C{python -m migrate.bench}: see L{migrate.bench._runner}.
"""

from migrate.bench._runner import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
