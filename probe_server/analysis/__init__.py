"""Results: classify and geolocate the addresses a survey saw, and report them.

- :mod:`.addresses`: what kind of IPv6 address fetched the blue balls.
- :mod:`.geo`: country and network owner from MaxMind-format databases, cached
  in the database so a report can be reproduced with the same answers.
- :mod:`.stats`: the Wilson score interval.
- :mod:`.report`: the paper's tables from the ``report_*`` SQL views.
- :mod:`.figure`: Figure 2, completed HITs over time per reward.
"""
