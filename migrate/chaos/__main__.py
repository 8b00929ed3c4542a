"""
C{python -m migrate.chaos}: run a fault campaign.
"""

from ._campaign import main

main()
