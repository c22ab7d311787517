"""The fixed grid every interval schedule runs on; no Prefect here.

Prefect counts an interval schedule from its ``anchor_date``, and without one
it takes the moment the deployment is created: every redeploy (``team up``
after a schedule changed, ``prefect deploy --all`` by hand, each start of
``shrinkflow schedule``) would move a team's hourly monitor to wherever the
clock stood then, and the runs the server had already scheduled are deleted
and made again on the new grid. Both ways of deploying
(flows/team.py's prefect.yaml, ``shrinkflow schedule``'s ``to_deployment``)
anchor every interval here instead, so a run lands on the same instants
whenever it was deployed: an hourly monitor on the hour (UTC), every 30
minutes at :00 and :30, a daily one at midnight UTC. Another phase is a cron
(``monitor.cron`` / ``lifecycle_cron``), which has no anchor to move.
"""

from __future__ import annotations

import datetime as dt

# 2000-01-01 00:00 UTC: a round epoch, so that an interval that divides a day
# lands on round clock times.
INTERVAL_ANCHOR = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
# The same instant as prefect.yaml writes it: Prefect's prefect.yaml schema
# takes `anchor_date` as a string (quoted there: YAML would read a bare
# timestamp as a date, which that schema refuses).
INTERVAL_ANCHOR_ISO = "2000-01-01T00:00:00Z"


def interval_next_run(interval_s: int, after: dt.datetime | None = None) -> dt.datetime:
    """The first instant at or after ``after`` (default: now; an aware
    datetime) on the grid of ``interval_s`` seconds from ``INTERVAL_ANCHOR``:
    when Prefect's scheduler starts the next run of such a schedule. UTC.
    Raises ValueError when ``interval_s`` is not positive."""
    if interval_s <= 0:
        raise ValueError(f"an interval must be positive, not {interval_s} s")
    after = after or dt.datetime.now(dt.timezone.utc)
    elapsed = (after - INTERVAL_ANCHOR) // dt.timedelta(microseconds=1)
    step = interval_s * 1_000_000
    return INTERVAL_ANCHOR + dt.timedelta(microseconds=-(-elapsed // step) * step)
